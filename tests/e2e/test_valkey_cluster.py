"""Training through a 3-shard Valkey Cluster whose primaries fail over mid-training, in ACL mode.

The cluster is the bundled ``valkey-server``, 3 primaries and 3 replicas, created with the
bundled ``valkey-cli`` (``deploy/cluster.py``). The deployment is given one node's URL: services and
agents use a cluster client and the cluster key layout (``Keys(cluster=True)``). The control
keys share one slot; the blobs spread over the shards. Mid-training the primary that serves the
control slot is killed (SIGKILL), then the primary of another shard that holds blobs: each time a
replica takes over, and the training completes with versions 0..N, one per round, each hashing
to its recorded digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from agents.client import FederatedClient
from agents.data import make_client_datasets
from federated_learning.bus.connection import connect, is_cluster, with_credentials
from federated_learning.deploy import acl
from federated_learning.deploy.cluster import LocalCluster
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import MalformedMessage, Task, VersionRecord, decode
from tests.e2e.conftest import Deployment, training_body, wait_status

pytestmark = pytest.mark.e2e

ROUNDS = 8
PASSWORD = "cluster-test-password"
KEYS = Keys(cluster=True)
AGENTS = [f"agent-{i:03d}" for i in range(8)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "cluster", shards=3, replicas=1, node_timeout_ms=1500,
                      password=PASSWORD) as started:
        yield started


@pytest.fixture
def cluster_deployment(tmp_path: Path, cluster: LocalCluster) -> Iterator[Deployment]:
    """In ACL mode: the launcher provisions the role users and the agents' users on every node."""
    deployed = Deployment(tmp_path / "data")
    deployed.env.update({"FL_REDIS_URL": cluster.url, "FL_REDIS_ACL": "true", "FL_REDIS_ADMIN_URL": cluster.url,
                         "FL_REDIS_ACL_AGENTS": json.dumps(AGENTS)})
    deployed.data_dir.mkdir(parents=True)
    deployed.start()
    yield deployed
    deployed.stop()


@pytest.fixture
async def cluster_agents(cluster: LocalCluster, cluster_deployment: Deployment) -> AsyncIterator[list[FederatedClient]]:
    clients, _ = make_client_datasets(len(AGENTS), "dirichlet:0.5", 0)
    started = []
    for agent_id, data in zip(AGENTS, clients, strict=True):
        user = acl.agent_user_name(KEYS, agent_id)
        login = with_credentials(cluster.url, user, acl.password_for(cluster_deployment.data_dir, user, create=False))
        agent = FederatedClient(agent_id, redis_url=login, heartbeat_interval_s=0.5)
        agent.add_dataset("digits", data.train.x, data.train.y, x_eval=data.eval.x, y_eval=data.eval.y)
        started.append(agent)
    await asyncio.gather(*(a.initialize() for a in started))
    yield started
    await asyncio.gather(*(a.close() for a in started), return_exceptions=True)


async def fail_over(cluster: LocalCluster, primary_port: int) -> int:
    """SIGKILL the primary on ``primary_port``; return the port of the replica that took over."""
    [before] = [owner for owner in cluster.owners() if owner.primary_port == primary_port][:1]
    assert before.replica_ports, f"the primary on {primary_port} has no replica to promote"
    cluster.node_on(primary_port).kill()
    for _ in range(600):
        await asyncio.sleep(0.05)
        try:
            promoted = {owner.primary_port for owner in cluster.owners() if owner.slot == before.slot}
        except RedisError:  # the node asked may be mid-election
            continue
        if promoted and promoted != {primary_port} and cluster.cluster_ok():
            [port] = promoted
            assert port in before.replica_ports
            return port
    raise AssertionError(f"no replica of the primary on {primary_port} took over within 30 s")


@pytest.fixture
async def observer(cluster: LocalCluster) -> AsyncIterator[aioredis.Redis]:
    """The test's own administrator connection (a cluster client), closed whatever the outcome."""
    connected = await connect(cluster.url, attempts=3)
    yield connected
    await connected.aclose()


class RoundGate:
    """Agents answer the tasks of the rounds the test allows, and hold later ones: the test, not
    the machine's speed, decides where the training stands at each failover (its rounds take
    tens of milliseconds, a failover seconds)."""

    def __init__(self, allowed: float) -> None:
        self.allowed = allowed
        self.changed = asyncio.Condition()

    async def allow(self, allowed: float) -> None:
        async with self.changed:
            self.allowed = allowed
            self.changed.notify_all()

    def hold(self, agent: FederatedClient) -> None:
        answer = agent.handle_task

        async def gated(fields: dict[bytes, bytes]) -> None:
            try:
                round_number = decode(Task, fields).round
            except MalformedMessage:  # not a task: nothing to hold
                round_number = 0
            async with self.changed:
                await self.changed.wait_for(lambda: round_number <= self.allowed)
            await answer(fields)

        agent.handle_task = gated  # type: ignore[method-assign]


async def test_a_training_survives_failovers_of_the_control_shard_and_a_blob_shard(
        cluster: LocalCluster, cluster_deployment: Deployment, cluster_agents: list[FederatedClient],
        observer: aioredis.Redis) -> None:
    assert is_cluster(observer)
    gate = RoundGate(allowed=2)
    for agent in cluster_agents:
        gate.hold(agent)
    async with cluster_deployment.client() as http:
        started = await http.post("/api/training/start", json=training_body(ROUNDS))
        assert started.status_code == 202, started.text
        training_id = started.json()["training_id"]

        # Every step writes the control slot, so the training waits for its replica's promotion.
        await wait_status(http, training_id, {"running"}, min_round=3)  # round 3's tasks held
        control = cluster.owner_of(KEYS.update_stream).primary_port
        promoted = await fail_over(cluster, control)

        # The uploads spread over the shards: a round needs every shard's blobs.
        await gate.allow(3)
        await wait_status(http, training_id, {"running"}, min_round=4)  # round 3 committed, round 4 held
        blob_shard = min(cluster.primary_ports() - {promoted})
        await fail_over(cluster, blob_shard)
        after = (await http.get(f"/api/training/{training_id}/status")).json()
        assert after["status"] == "running" and after["current_version"] < ROUNDS, after
        await gate.allow(math.inf)

        status = await wait_status(http, training_id, {"completed", "failed"}, timeout_s=180)
        assert status["status"] == "completed", status.get("reason")

        records = sorted((VersionRecord.model_validate_json(raw)
                          for raw in (await observer.hgetall(KEYS.versions(training_id))).values()),
                         key=lambda r: r.version)
        assert [r.version for r in records] == list(range(ROUNDS + 1))
        assert [r.round for r in records] == list(range(ROUNDS + 1))
        for record in records:
            served = await http.get(f"/api/training/{training_id}/versions/{record.version}/model")
            assert served.status_code == 200, served.text
            assert hashlib.sha256(served.content).hexdigest() == record.model_digest
            stored = await observer.get(KEYS.blob(record.model_digest))  # None: pruned, or lost
            assert stored is None or hashlib.sha256(stored).hexdigest() == record.model_digest  # at a failover
        assert await observer.hlen(KEYS.agent_contributions) > 0, "no contribution was credited"
    # The two killed primaries' logs went with them; every live node's is empty.
    denied = await observer.execute_command("ACL", "LOG", target_nodes=RedisCluster.ALL_NODES)
    assert not any(denied.values()), f"a role was denied a command it used: {denied}"
