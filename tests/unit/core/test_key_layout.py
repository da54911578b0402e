"""The key layouts: a standalone server's names, and a cluster's hash slots."""

from __future__ import annotations

import inspect
from fnmatch import fnmatchcase

import pytest
from redis.crc import key_slot

from federated_learning.protocol.keys import Keys
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
                                            "dashboard_write_keys"}:
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
