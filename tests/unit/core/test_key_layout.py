"""The key layouts: a standalone server's names, and a cluster's hash slots."""

from __future__ import annotations

import inspect
from fnmatch import fnmatchcase

import pytest
from redis.crc import key_slot

from federated_learning.protocol.keys import Keys, partition_of
from federated_learning.types import AgentId, BlobDigest, RoundNumber, TrainingId

TRAINING = TrainingId("acme.t1")
AGENT = AgentId("agent-001")


def every_key(keys: Keys) -> dict[str, str]:
    """Each key-naming property and method of ``keys`` (methods called with sample arguments)."""
    samples: dict[str, object] = {"training_id": TRAINING, "agent_id": AGENT, "round_number": RoundNumber(3),
                                  "service": "coordinator", "entry_id": "1-0", "attempt": 1, "part": "keys",
                                  "org_id": "acme", "instance": "0", "credential": "c", "minute": 7,
                                  "partition": 2, "partitions": 4}
    names: dict[str, str] = {}
    for name, member in inspect.getmembers(type(keys)):
        if name.startswith("_") or name in {"blob", "blob_store", "model_owner", "agent_write_keys",
                                            "dashboard_write_keys", "in_cell", "for_training", "cells",
                                            "global_keys"}:
            continue
        if name.endswith("pattern") or name == "upload_pattern":
            continue
        if isinstance(member, property):
            names[name] = getattr(keys, name)
        elif inspect.isfunction(member):
            parameters = list(inspect.signature(member).parameters)[1:]
            names[name] = getattr(keys, name)(*(samples[p] for p in parameters))
    return names


def test_standalone_names_are_unchanged_by_the_cluster_layout() -> None:
    keys = Keys("fl")
    assert keys.update_stream == "fl:stream:updates"
    assert keys.training(TRAINING) == "fl:training:{t:acme.t1}"
    assert keys.blob(BlobDigest("ab" * 32)) == f"fl:blob:{'ab' * 32}"
    assert keys.dead_letters("monitor") == "fl:stream:dead:monitor"


def test_on_a_cluster_every_key_but_the_blobs_shares_one_slot() -> None:
    """The coordinator's transactions write a training's keys with the shared streams, the
    registry and the agents' inboxes: one slot for all of them."""
    keys = Keys("fl", cluster=True)
    names = every_key(keys)
    assert len(names) > 40
    # Partition 2 of 4's lease is in the slot of that partition's steps (the cell test below).
    assert names.pop("coordinator_lease_of") == "fl:{fl:p2}:lease:coordinator:p2"
    assert names.pop("coordinator_wanted") == "fl:{fl:p2}:lease:coordinator:p2:wanted"
    slots = {name: key_slot(key.encode()) for name, key in names.items()}
    assert set(slots.values()) == {key_slot(b"fl")}, slots
    assert all(key.startswith("fl:{fl}:") for key in names.values())


@pytest.mark.parametrize("cluster", [False, True])
def test_where_the_blobs_are_is_readable_with_the_models(cluster: bool) -> None:
    """Agents' ACL users read ``blob_pattern`` keys only: the published store must be one."""
    keys = Keys("fl", cluster=cluster)
    assert fnmatchcase(keys.blob_store, keys.blob_pattern)
    assert not fnmatchcase(keys.blob_store, keys.upload_pattern())


def test_on_a_cluster_blobs_spread_over_the_slots() -> None:
    keys = Keys("fl", cluster=True)
    digests = [BlobDigest(f"{i:064x}") for i in range(200)]
    services = {key_slot(keys.blob(d).encode()) for d in digests}
    uploads = {key_slot(keys.blob(d, AGENT).encode()) for d in digests}
    assert len(services) > 150 and len(uploads) > 150
    assert keys.blob(digests[0]) == Keys("fl").blob(digests[0])  # blob names are the same in both layouts


def test_the_access_patterns_still_match_on_a_cluster() -> None:
    """The ACL globs (services: every key; agents: their uploads; readers: the blobs)."""
    keys = Keys("fl", cluster=True)
    assert fnmatchcase(keys.update_stream, keys.all_keys_pattern)
    assert fnmatchcase(keys.blob(BlobDigest("ab" * 32)), keys.all_keys_pattern)
    assert fnmatchcase(keys.blob(BlobDigest("ab" * 32), AGENT), keys.all_keys_pattern)
    assert fnmatchcase(keys.blob(BlobDigest("ab" * 32)), keys.blob_pattern)
    assert fnmatchcase(keys.blob(BlobDigest("ab" * 32), AGENT), keys.upload_pattern(AGENT))
    assert not fnmatchcase(keys.blob(BlobDigest("ab" * 32), "agent-002"), keys.upload_pattern(AGENT))


CELL_STREAMS = ("accepted_update_stream", "refused_update_stream", "job_stream", "aggregate_stream",
                "release_stream", "version_stream", "event_stream", "outbox_stream")


def trainings_of_each_cell(partitions: int) -> dict[int, TrainingId]:
    found: dict[int, TrainingId] = {}
    for i in range(1000):
        found.setdefault(partition_of(f"acme.t{i}", partitions), TrainingId(f"acme.t{i}"))
        if len(found) == partitions:
            return found
    raise AssertionError("no training id for some cell")


def test_one_partition_keeps_every_name() -> None:
    for cluster in (False, True):
        keys = Keys("fl", cluster=cluster)
        assert keys.cells == [keys] and keys.for_training(TRAINING) is keys
        split = every_key(Keys("fl", cluster=cluster, partitions=4))  # cell 0's names
        training_keys = {name for name, key in every_key(keys).items() if "{t:" in key}
        assert len(training_keys) > 10
        for name, key in every_key(keys).items():
            if not (cluster and name in training_keys):  # on a cluster a training's keys are in its cell
                assert split[name] == key, name


def test_a_cells_streams_and_counters_have_names_of_their_own() -> None:
    keys = Keys("fl", partitions=4)
    cell = keys.in_cell(2)
    assert cell.job_stream == "fl:p2:stream:jobs"
    assert cell.agent_stats == "fl:p2:agents:stats"
    assert cell.applied("coordinator-updates", "1-0") == "fl:p2:applied:coordinator-updates:1-0"
    assert cell.inbox_stream(AGENT) == keys.inbox_stream(AGENT) == "fl:inbox:agent-001"  # the deployment's
    assert cell.update_stream == keys.update_stream and cell.control_stream == keys.control_stream
    assert keys.coordinator_lease_of(2, 4) == "fl:p2:lease:coordinator:p2"
    assert keys.training(TRAINING) == "fl:training:{t:acme.t1}"  # one server: no slot to share
    streams = {getattr(c, name) for c in keys.cells for name in CELL_STREAMS}
    assert len(streams) == 4 * len(CELL_STREAMS)
    with pytest.raises(ValueError, match="cell 4 of 4"):
        keys.in_cell(4)


def test_on_a_cluster_each_partitions_step_writes_one_slot() -> None:
    """Everything a partition's coordinator step writes in its transaction (the training's keys,
    its cell's streams, markers and counters, and the lease it is fenced by) is in one slot; the
    partitions' slots differ, and what belongs to no training stays in the deployment's slot."""
    keys = Keys("fl", cluster=True, partitions=4)
    deployment = key_slot(b"fl")
    slots = set()
    for cell, training in trainings_of_each_cell(4).items():
        own = keys.for_training(training)
        assert own.cell == cell
        written = [keys.training(training), keys.training_view(training), keys.round_updates(training, RoundNumber(2)),
                   keys.agent_outcomes(training), keys.training_metrics(training), keys.versions(training),
                   keys.release(training), keys.privacy_budget(training),
                   keys.secure_exchange(training, RoundNumber(2), 1, "keys"),
                   own.applied("coordinator-updates", "1-0"), own.agent_stats, own.agent_contributions,
                   keys.coordinator_lease_of(cell, 4), *(getattr(own, name) for name in CELL_STREAMS)]
        if cell == 0:
            written.append(keys.inbox_stream(AGENT))  # cell 0 writes the inboxes directly
        cell_slots = {key_slot(key.encode()) for key in written}
        assert len(cell_slots) == 1, written
        slots |= cell_slots
    assert len(slots) == 4 and deployment in slots
    for name in ("update_stream", "control_stream", "agent_stream", "agents", "trainings", "active_trainings",
                 "training_queue", "alerts", "rejections"):
        assert key_slot(getattr(keys.in_cell(3), name).encode()) == deployment, name
    assert key_slot(keys.inbox_stream(AGENT).encode()) == deployment


def test_the_dashboard_may_write_every_cells_events() -> None:
    keys = Keys("fl", cluster=True, partitions=3)
    writable = keys.dashboard_write_keys()
    assert all(cell.event_stream in writable for cell in keys.cells)
