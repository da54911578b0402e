"""The services' cluster client against a real 3-primary Valkey Cluster (``deploy/cluster.py``)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, WatchError

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


async def test_a_transaction_starts_no_thread(client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py's own cluster transaction starts a thread per command (WATCH, the reads before
    MULTI, every queued one); ours starts none, and the transaction still runs whole."""
    keys = keys_for(client, "fl")
    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        started.append(thread)
        real_start(thread)

    await client.set(keys.coordinator_lease, b"7")
    async with client.pipeline(transaction=True) as pipe:
        monkeypatch.setattr(threading.Thread, "start", counting_start)
        await pipe.watch(keys.coordinator_lease)
        assert await pipe.get(keys.coordinator_lease) == b"7"
        pipe.multi()  # type: ignore[no-untyped-call]
        for i in range(200):
            pipe.hincrby(keys.agent_stats, f"agent-{i}:asked", 1)
        pipe.xadd(keys.event_stream, {"m": "x"})
        pipe.set(keys.training("t"), b"state")
        pipe.eval("return redis.call('GET', KEYS[1])", 1, keys.training("t"))
        replies = await pipe.execute()
        monkeypatch.undo()
    assert started == []
    assert len(replies) == 203 and replies[0] == 1 and replies[-1] == b"state"
    assert await client.hget(keys.agent_stats, "agent-199:asked") == b"1"
    assert await client.get(keys.training("t")) == b"state"


async def test_a_watched_key_that_changes_fails_the_transaction(client: aioredis.Redis) -> None:
    keys = keys_for(client, "fl")
    await client.set(keys.coordinator_lease, b"1")
    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch(keys.coordinator_lease)
        await client.set(keys.coordinator_lease, b"2")  # another client, meanwhile
        pipe.multi()  # type: ignore[no-untyped-call]
        pipe.set(keys.training("w"), b"stale")
        with pytest.raises(WatchError):
            await pipe.execute()
    assert await client.get(keys.training("w")) is None


async def test_watching_keys_of_two_slots_is_refused(client: aioredis.Redis) -> None:
    keys = keys_for(client, "fl")
    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch(keys.coordinator_lease)
        with pytest.raises(RedisClusterException, match="different slots"):
            await pipe.get(keys.blob("ab" * 32))


async def test_keys_of_two_slots_in_one_transaction_are_still_refused(client: aioredis.Redis) -> None:
    keys = keys_for(client, "fl")
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(keys.training("t"), b"state")
        pipe.set(keys.blob("ab" * 32), b"blob")  # blobs hash to slots of their own
        with pytest.raises(RedisClusterException, match="same slot"):
            await pipe.execute()


async def test_a_command_whose_keys_it_does_not_know_takes_redis_pys_path(client: aioredis.Redis) -> None:
    keys = keys_for(client, "fl")
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(keys.training("u"), b"1")
        pipe.eval("return 5", 0)  # no keys: redis-py finds the slot (the transaction's)
        pipe.append(keys.training("u"), b"2")  # not among the commands it knows
        assert await pipe.execute() == [True, 5, 2]
    assert await client.get(keys.training("u")) == b"12"


async def test_watching_keys_of_two_slots_at_once_is_refused_before_anything_is_watched(
        client: aioredis.Redis) -> None:
    keys = keys_for(client, "fl")
    async with client.pipeline(transaction=True) as pipe:
        with pytest.raises(RedisClusterException, match="WATCH - all keys must map to the same key slot"):
            await pipe.watch(keys.coordinator_lease, keys.blob("ab" * 32))
        pipe.set(keys.training("v"), b"1")  # not watching: queued, as redis-py would
        assert await pipe.execute() == [True]


async def test_a_keyless_script_first_follows_the_keyed_commands_slot(client: aioredis.Redis) -> None:
    """As redis-py does: a keyless script can run anywhere, so the first keyed command decides."""
    keys = keys_for(client, "fl")
    async with client.pipeline(transaction=True) as pipe:
        pipe.eval("return 5", 0)
        pipe.set(keys.blob("cd" * 32), b"x")  # a slot of its own, not the tag's
        assert await pipe.execute() == [5, True]
