"""Stream semantics against the real server: groups, acks, claims, dead letters, blobs."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from federated_learning.bus.blobs import BlobMissing, BlobStore
from federated_learning.bus.consumer import StreamConsumer, ensure_group
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.tensors import InvalidTensor, digest_of

STREAM = "test:stream"


def consumer(redis: aioredis.Redis, name: str, handler, **kwargs) -> StreamConsumer:  # type: ignore[no-untyped-def]
    return StreamConsumer(redis, "g", name, {STREAM: handler}, dead_letter_stream="test:dead",
                          block_ms=50, **kwargs)


async def test_creating_an_existing_group_is_fine(redis: aioredis.Redis) -> None:
    await ensure_group(redis, STREAM, "g")
    await ensure_group(redis, STREAM, "g")
    assert len(await redis.xinfo_groups(STREAM)) == 1


async def test_group_on_a_key_of_another_type_is_refused(redis: aioredis.Redis) -> None:
    await redis.set(STREAM, "x")
    with pytest.raises(TypeError, match="not a stream; refusing to delete it"):
        await ensure_group(redis, STREAM, "g")


async def test_entries_are_acked_after_the_handler_returns(redis: aioredis.Redis) -> None:
    seen: list[bytes] = []

    async def handle(_id: bytes, fields: dict[bytes, bytes]) -> None:
        seen.append(fields[b"n"])

    for n in range(3):
        await redis.xadd(STREAM, {"n": str(n)})
    await consumer(redis, "c1", handle).run(asyncio.Event(), burst=True)
    assert seen == [b"0", b"1", b"2"]
    assert (await redis.xpending(STREAM, "g"))["pending"] == 0


async def test_failing_entry_stays_pending_then_goes_to_dead_letters(redis: aioredis.Redis) -> None:
    attempts = 0

    async def handle(_id: bytes, _fields: dict[bytes, bytes]) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("boom")

    await redis.xadd(STREAM, {"n": "1"})
    await consumer(redis, "c1", handle, max_deliveries=3).run(asyncio.Event(), burst=True)
    assert attempts == 3
    assert (await redis.xpending(STREAM, "g"))["pending"] == 0
    dead = await redis.xrange("test:dead")
    assert dead[0][1][b"stream"] == STREAM.encode()


async def test_entries_of_a_dead_consumer_are_claimed_after_idle_timeout(redis: aioredis.Redis) -> None:
    await ensure_group(redis, STREAM, "g")
    await redis.xadd(STREAM, {"n": "1"})
    await redis.xreadgroup("g", "dead-worker", {STREAM: ">"}, count=1)  # read, never acked
    handled: list[bytes] = []

    async def handle(entry_id: bytes, _fields: dict[bytes, bytes]) -> None:
        handled.append(entry_id)

    live = consumer(redis, "live-worker", handle, claim_idle_ms=100)
    await live.setup()
    assert await live.poll_once() == 0  # not idle long enough yet
    await asyncio.sleep(0.15)
    live._last_claim = 0.0
    assert await live.poll_once() == 1
    assert live.stats.claimed == 1
    assert (await redis.xpending(STREAM, "g"))["pending"] == 0


async def test_restarted_consumer_handles_its_own_pending_entries_first(redis: aioredis.Redis) -> None:
    await ensure_group(redis, STREAM, "g")
    await redis.xadd(STREAM, {"n": "1"})
    await redis.xreadgroup("g", "worker-0", {STREAM: ">"}, count=1)
    handled: list[bytes] = []

    async def handle(_id: bytes, fields: dict[bytes, bytes]) -> None:
        handled.append(fields[b"n"])

    restarted = consumer(redis, "worker-0", handle)
    await restarted.setup()
    assert await restarted.drain_own_pending() == 1
    assert handled == [b"1"]


async def test_blob_store_round_trip_and_limits(redis: aioredis.Redis) -> None:
    store = BlobStore(redis, Keys(), max_bytes=1024)
    digest = await store.put(b"hello")
    assert digest == digest_of(b"hello")
    assert await store.get(digest) == b"hello"
    with pytest.raises(InvalidTensor, match="exceeds the limit"):
        await store.put(b"x" * 2048)
    with pytest.raises(BlobMissing):
        await store.get("0" * 64)


async def test_tampered_blob_fails_its_hash(redis: aioredis.Redis) -> None:
    store = BlobStore(redis, Keys(), max_bytes=1024)
    digest = await store.put(b"hello")
    await redis.set(Keys().blob(digest), b"evil")
    with pytest.raises(InvalidTensor) as info:
        await store.get(digest)
    assert info.value.reason == "hash_mismatch"


async def test_trimming_keeps_unread_and_unacknowledged_entries(redis: aioredis.Redis) -> None:
    from federated_learning.bus.consumer import trim_consumed

    await ensure_group(redis, STREAM, "g")
    ids = [await redis.xadd(STREAM, {"n": str(n)}) for n in range(300)]
    read = await redis.xreadgroup("g", "c", {STREAM: ">"}, count=200)
    handled = [entry_id for entry_id, _ in read[0][1]]
    await redis.xack(STREAM, "g", *handled[:150])  # 150..199 stay pending, 200..299 unread

    assert await trim_consumed(redis, STREAM, "g")

    remaining = [entry_id for entry_id, _ in await redis.xrange(STREAM)]
    assert set(ids[150:]) <= set(remaining)
    assert ids[0] not in remaining  # approximate trimming drops whole nodes (100 entries by default)
    assert not await trim_consumed(redis, "no:such:stream", "g")


async def test_entry_that_keeps_killing_its_consumer_is_dead_lettered_unhandled(redis: aioredis.Redis) -> None:
    await ensure_group(redis, STREAM, "g")
    await redis.xadd(STREAM, {"n": "poison"})
    await redis.xreadgroup("g", "worker-0", {STREAM: ">"})
    for _ in range(5):  # five restarts, each dying while handling its pending entry
        await redis.xreadgroup("g", "worker-0", {STREAM: "0"})
    calls = 0

    async def handle(_id: bytes, _fields: dict[bytes, bytes]) -> None:
        nonlocal calls
        calls += 1

    restarted = consumer(redis, "worker-0", handle)
    await restarted.setup()
    await restarted.drain_own_pending()
    assert calls == 0
    assert (await redis.xpending(STREAM, "g"))["pending"] == 0
    assert (await redis.xrange("test:dead"))[0][1][b"n"] == b"poison"
