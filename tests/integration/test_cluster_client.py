"""The services' cluster client against a real 3-primary Valkey Cluster (``deploy/cluster.py``)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException

from federated_learning.bus.cluster_client import ServicesCluster
from federated_learning.bus.connection import connect, is_cluster, keys_for
from federated_learning.deploy.cluster import LocalCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(Path(tmp_path_factory.mktemp("cluster")), shards=3, replicas=0) as started:
        yield started


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[aioredis.Redis]:
    connected = await connect(cluster.url, attempts=3)
    yield connected
    await connected.aclose()


async def test_connect_finds_the_cluster_and_its_key_layout(client: aioredis.Redis) -> None:
    assert is_cluster(client) and isinstance(client, ServicesCluster)
    assert keys_for(client, "fl").update_stream == "fl:{fl}:stream:updates"


async def test_a_transaction_queues_its_commands_on_the_callers_thread(client: aioredis.Redis,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py's own cluster transaction starts a thread per queued command; ours starts none,
    and the transaction still runs whole (WATCH and the reads before MULTI keep their path)."""
    keys = keys_for(client, "fl")
    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        started.append(thread)
        real_start(thread)

    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch(keys.coordinator_lease)
        await pipe.get(keys.coordinator_lease)
        pipe.multi()  # type: ignore[no-untyped-call]
        monkeypatch.setattr(threading.Thread, "start", counting_start)
        for i in range(200):
            pipe.hincrby(keys.agent_stats, f"agent-{i}:asked", 1)
        pipe.xadd(keys.event_stream, {"m": "x"})
        pipe.set(keys.training("t"), b"state")
        monkeypatch.undo()
        replies = await pipe.execute()
    assert started == []
    assert len(replies) == 202 and replies[0] == 1
    assert await client.hget(keys.agent_stats, "agent-199:asked") == b"1"
    assert await client.get(keys.training("t")) == b"state"


async def test_keys_of_two_slots_in_one_transaction_are_still_refused(client: aioredis.Redis) -> None:
    keys = keys_for(client, "fl")
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(keys.training("t"), b"state")
        pipe.set(keys.blob("ab" * 32), b"blob")  # blobs hash to slots of their own
        with pytest.raises(RedisClusterException, match="same slot"):
            await pipe.execute()


async def test_a_command_that_is_not_key_first_takes_redis_pys_path(client: aioredis.Redis) -> None:
    keys = keys_for(client, "fl")
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(keys.training("u"), b"1")
        pipe.eval("return redis.call('GET', KEYS[1])", 1, keys.training("u"))
        assert await pipe.execute() == [True, b"1"]
