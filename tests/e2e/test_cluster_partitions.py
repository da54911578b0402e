"""Coordinator partitions as cells of a 3-shard Valkey Cluster (decision 0019).

With ``coordinator_partitions`` = 3 each partition's streams, counters and trainings live in a hash
slot of their own (``protocol/keys.py``), and the three slots fall on the three shards. A
training in each partition runs to the end through the deployed services: the tasks of cells 1
and 2 reach the agents through their outboxes, and each cell's jobs, releases and versions are
written and read on its own shard. The monitor raises an alert about a training of cell 2 from
that cell's event stream, in the deployment's slot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from agents.client import FederatedClient
from agents.data import make_client_datasets
from federated_learning.bus.connection import connect
from federated_learning.deploy.cluster import LocalCluster
from federated_learning.protocol.events import Event
from federated_learning.protocol.keys import Keys, partition_of
from federated_learning.protocol.messages import Severity, VersionRecord, encode
from tests.e2e.conftest import Deployment, training_body, wait_status
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.e2e

PARTITIONS = 3
ROUNDS = 3
KEYS = Keys(cluster=True, partitions=PARTITIONS)
AGENTS = [f"agent-{i:03d}" for i in range(6)]


def one_training_per_cell() -> list[str]:
    found: dict[int, str] = {}
    for i in range(1000):
        found.setdefault(partition_of(f"cells-{i}", PARTITIONS), f"cells-{i}")
    return [found[cell] for cell in range(PARTITIONS)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "cluster", shards=3, replicas=0) as started:
        yield started


@pytest.fixture
def deployment(tmp_path: Path, cluster: LocalCluster) -> Iterator[Deployment]:
    deployed = Deployment(tmp_path / "data")
    deployed.env.update({"FL_REDIS_URL": cluster.url, "FL_COORDINATOR_PARTITIONS": str(PARTITIONS),
                         "FL_MAX_CONCURRENT_TRAININGS": str(PARTITIONS)})
    deployed.data_dir.mkdir(parents=True)
    deployed.start()
    yield deployed
    deployed.stop()


@pytest.fixture
async def observer(cluster: LocalCluster) -> AsyncIterator[aioredis.Redis]:
    connected = await connect(cluster.url, attempts=3)
    yield connected
    await connected.aclose()


@pytest.fixture
async def agents(cluster: LocalCluster, deployment: Deployment) -> AsyncIterator[list[FederatedClient]]:
    clients, _ = make_client_datasets(len(AGENTS), "dirichlet:0.5", 0)
    started = []
    for agent_id, data in zip(AGENTS, clients, strict=True):
        agent = FederatedClient(agent_id, redis_url=cluster.url, heartbeat_interval_s=0.5)
        agent.add_dataset("digits", data.train.x, data.train.y, x_eval=data.eval.x, y_eval=data.eval.y)
        started.append(agent)
    await asyncio.gather(*(a.initialize() for a in started))
    yield started
    await asyncio.gather(*(a.close() for a in started), return_exceptions=True)


async def test_each_partitions_trainings_run_on_a_shard_of_its_own(
        cluster: LocalCluster, deployment: Deployment, agents: list[FederatedClient],
        observer: aioredis.Redis) -> None:
    shards = {cell.cell: cluster.owner_of(cell.job_stream).primary_port for cell in KEYS.cells}
    assert len(set(shards.values())) == PARTITIONS, f"the cells' slots share a shard: {shards}"
    trainings = one_training_per_cell()
    async with deployment.client() as http:
        for training_id in trainings:
            started = await http.post("/api/training/start",
                                      json=training_body(ROUNDS, training_id=training_id, clients_per_round=4,
                                                         min_clients=3))
            assert started.status_code == 202, started.text
        for training_id in trainings:
            status = await wait_status(http, training_id, {"completed", "failed"}, timeout_s=180)
            assert status["status"] == "completed", (training_id, status.get("reason"))

            cell = KEYS.for_training(training_id)
            assert cluster.owner_of(KEYS.training(training_id)).primary_port == shards[cell.cell]
            records = sorted((VersionRecord.model_validate_json(raw)
                              for raw in (await observer.hgetall(KEYS.versions(training_id))).values()),
                             key=lambda r: r.version)
            assert [r.round for r in records] == list(range(ROUNDS + 1)), training_id
            for stream in (cell.job_stream, cell.release_stream, cell.version_stream, cell.event_stream):
                entries = await observer.xrange(stream)
                assert any(json.loads(fields[b"m"]).get("training_id") == training_id for _, fields in entries), \
                    f"{training_id}: nothing on {stream}"
    # Each task was delivered once: the agents' ``asked`` counters (the deployment's, bumped as a
    # task reaches its inbox, directly or from an outbox) add up to what the rounds asked for.
    selected = 0
    for cell in KEYS.cells:
        for _, fields in await observer.xrange(cell.event_stream):
            event = json.loads(fields[b"m"])
            if event["kind"] in ("round_started", "round_retried"):
                selected += int(event["data"]["selected"])
    asked = sum(int(count) for name, count in (await observer.hgetall(KEYS.agent_stats)).items()
                if name.endswith(b":asked"))
    assert selected >= PARTITIONS * (ROUNDS + 1) * 3 and asked == selected
    for cell in KEYS.cells[1:]:
        assert (await observer.xpending(cell.outbox_stream, "forwarder"))["pending"] == 0


async def test_the_monitor_raises_alerts_about_another_cells_training(
        cluster: LocalCluster, deployment: Deployment, observer: aioredis.Redis) -> None:
    """The alert and its event are written with the deployment's alerts (one slot), whatever the
    cell of the training the alert is about."""
    training_id = one_training_per_cell()[2]
    flag = {"agent_id": "agent-007", "norm": 40.0, "norm_z": 9.0, "cosine": -0.9, "cosine_z": -8.0,
            "reasons": ["norm"]}
    anomaly = Event(kind="update_anomaly", source="aggregator", severity=Severity.WARNING,
                    message="1 of 6 updates look anomalous", training_id=training_id, round=4,
                    data={"flags": [flag]})
    await observer.xadd(KEYS.for_training(training_id).event_stream, encode(anomaly))

    async def alert_raised() -> bool:
        return await observer.hexists(KEYS.open_alerts, f"suspicious_update:{training_id}:agent-007")

    await wait_until(alert_raised, "the monitor opens the alert", 60)
    announced = [json.loads(fields[b"m"]) for _, fields in await observer.xrange(KEYS.event_stream)]
    assert any(e["kind"] == "alert" and e["training_id"] == training_id for e in announced)
    async with deployment.client() as http:
        alerts = (await http.get("/api/alerts")).json()
    assert any(a.get("training_id") == training_id for a in alerts), alerts
