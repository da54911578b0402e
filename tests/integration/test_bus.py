"""Stream semantics against the real server: groups, acks, claims, dead letters, blobs."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis.asyncio as aioredis

from federated_learning.bus import blobs as blobs_module
from federated_learning.bus.blobs import (
    HEAD_PROBE_BYTES,
    SMALL_BLOB_BYTES,
    BlobMissing,
    RedisBlobStore,
)
from federated_learning.bus.consumer import StreamConsumer, ensure_group, run_consumers
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.tensors import (
    InvalidTensor,
    digest_of,
    encode_layers,
    header_bytes_needed,
)

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


async def test_a_batch_handler_gets_a_read_together_and_it_is_acked_at_once(redis: aioredis.Redis) -> None:
    batches: list[list[bytes]] = []
    singles: list[bytes] = []

    async def handle(_id: bytes, fields: dict[bytes, bytes]) -> None:
        singles.append(fields[b"n"])

    async def handle_batch(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        assert (await redis.xpending(STREAM, "g"))["pending"] == len(entries), "acked only after the handler"
        batches.append([fields[b"n"] for _id, fields in entries])

    for n in range(5):
        await redis.xadd(STREAM, {"n": str(n)})
    await consumer(redis, "c1", handle, batch_handlers={STREAM: handle_batch}, count=3).run(
        asyncio.Event(), burst=True)
    assert batches == [[b"0", b"1", b"2"], [b"3", b"4"]] and singles == []
    assert (await redis.xpending(STREAM, "g"))["pending"] == 0


async def test_when_a_batch_fails_each_entry_is_handled_on_its_own(redis: aioredis.Redis) -> None:
    handled: list[bytes] = []

    async def handle(_id: bytes, fields: dict[bytes, bytes]) -> None:
        if fields[b"n"] == b"bad":
            raise RuntimeError("this one entry cannot be handled")
        handled.append(fields[b"n"])

    async def handle_batch(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            await handle(entry_id, fields)

    for n in ("0", "bad", "2"):
        await redis.xadd(STREAM, {"n": n})
    await consumer(redis, "c1", handle, batch_handlers={STREAM: handle_batch}, max_deliveries=2).run(
        asyncio.Event(), burst=True)
    assert handled == [b"0", b"0", b"2"], "the batch's first entry once in the batch, then each alone"
    assert (await redis.xpending(STREAM, "g"))["pending"] == 0
    [(_id, dead)] = await redis.xrange("test:dead")
    assert dead[b"n"] == b"bad"


def test_a_batch_handler_needs_a_per_entry_handler(redis: aioredis.Redis) -> None:
    async def handle_batch(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        return None

    with pytest.raises(ValueError, match="per-entry handler"):
        StreamConsumer(redis, "g", "c1", {}, dead_letter_stream="test:dead", batch_handlers={STREAM: handle_batch})


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
    store = RedisBlobStore(redis, Keys(), max_bytes=1024)
    digest = await store.put(b"hello")
    assert digest == digest_of(b"hello")
    assert await store.get(digest) == b"hello"
    with pytest.raises(InvalidTensor, match="exceeds the limit"):
        await store.put(b"x" * 2048)
    with pytest.raises(BlobMissing):
        await store.get("0" * 64)


async def test_a_blob_head_is_its_size_and_whole_header_without_its_body(redis: aioredis.Redis) -> None:
    store = RedisBlobStore(redis, Keys(), max_bytes=1 << 22)
    long_header = {f"layer.{k:04d}.weight": np.zeros(1, np.float32) for k in range(600)}  # > HEAD_PROBE_BYTES
    for layers in ({"w": np.zeros(100_000, np.float32)}, long_header):
        data = encode_layers(layers)
        digest = await store.put(data, owner="a1")
        head = await store.head(digest, owner="a1")
        assert head.size == len(data) and len(head.head) == min(len(data), max(header_bytes_needed(data),
                                                                              HEAD_PROBE_BYTES))
        assert data.startswith(head.head) and len(head.head) >= header_bytes_needed(data)
    assert header_bytes_needed(encode_layers(long_header)) > HEAD_PROBE_BYTES
    with pytest.raises(BlobMissing):
        await store.head("0" * 64, owner="a1")


async def test_tampered_blob_fails_its_hash(redis: aioredis.Redis) -> None:
    store = RedisBlobStore(redis, Keys(), max_bytes=1024)
    digest = await store.put(b"hello")
    await redis.set(Keys().blob(digest), b"evil")
    with pytest.raises(InvalidTensor) as info:
        await store.get(digest)
    assert info.value.reason == "hash_mismatch"


async def test_get_each_fetches_small_blobs_together_and_large_ones_alone_in_order(redis: aioredis.Redis) -> None:
    """Every outcome, in the order asked, whichever path a blob took (small: one pipeline per
    SMALL_BATCH_BYTES and one checking call; large: a thread and a connection each)."""
    store = RedisBlobStore(redis, Keys(), max_bytes=SMALL_BLOB_BYTES * 3)
    small = [bytes([i]) * 1000 for i in range(5)]
    large = [bytes([9 - i]) * (SMALL_BLOB_BYTES + 1) for i in range(2)]
    digests = [await store.put(data, owner="a1") for data in small + large]
    tampered, oversized = await store.put(b"fine", owner="a1"), await store.put(b"x" * 10, owner="a2")
    await redis.set(Keys().blob(tampered, "a1"), b"evil")
    await redis.set(Keys().blob(oversized, "a2"), b"x" * (SMALL_BLOB_BYTES * 3 + 1))
    asked = [(digests[5], "a1"), (digests[0], "a1"), ("0" * 64, "a1"), (tampered, "a1"), (digests[1], "a1"),
             (oversized, "a2"), (digests[6], "a1"), *((d, "a1") for d in digests[2:5])]

    def refuse_the_fourth_small(index: int, data: bytes) -> bytes:
        if data == small[3]:
            raise InvalidTensor("bad_values", "refused by the check")
        return data

    with ThreadPoolExecutor(2) as executor:
        results = await store.get_each(asked, refuse_the_fourth_small, executor=executor)
    store.close()
    assert results[0] == large[0] and results[1] == small[0] and results[4] == small[1]
    assert results[6] == large[1] and results[7] == small[2] and results[9] == small[4]
    assert isinstance(results[2], BlobMissing)
    assert isinstance(results[3], InvalidTensor) and results[3].reason == "hash_mismatch"
    assert isinstance(results[5], InvalidTensor) and results[5].reason == "too_large"
    assert isinstance(results[8], InvalidTensor) and results[8].reason == "bad_values"


async def test_small_blobs_are_fetched_in_batches_of_bounded_bytes(redis: aioredis.Redis,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blobs_module, "SMALL_BATCH_BYTES", 2500)  # two 1,000-byte blobs per batch
    store = RedisBlobStore(redis, Keys(), max_bytes=1 << 20)
    data = [bytes([i]) * 1000 for i in range(7)]
    digests = [await store.put(blob) for blob in data]
    pipelines: list[int] = []
    real_pipeline = redis.pipeline

    def counting_pipeline(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        pipe = real_pipeline(*args, **kwargs)  # type: ignore[arg-type]
        pipelines.append(1)
        return pipe

    monkeypatch.setattr(redis, "pipeline", counting_pipeline)
    with ThreadPoolExecutor(2) as executor:
        results = await store.get_each([(d, None) for d in digests], lambda _, blob: blob, executor=executor)
    assert results == data
    assert len(pipelines) == 1 + 4  # the sizes, then batches of 2, 2, 2 and 1 blobs


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


async def test_a_burst_reads_what_the_idle_hook_wrote_in_a_quiet_pass(redis: aioredis.Redis) -> None:
    """A partition's coordinator: its tick (the first consumer's idle hook) may stage tasks in its
    outbox in a pass that read nothing; the forwarder (another consumer) must still get them."""
    other = "test:other"
    forwarded: list[bytes] = []
    ticks = 0

    async def ignore(_entry_id: bytes, _fields: dict[bytes, bytes]) -> None:
        return None

    async def forward(_entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        forwarded.append(fields[b"task"])

    async def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticks == 1:
            await redis.xadd(other, {"task": "t1"})

    main = consumer(redis, "main", ignore)
    forwarder = StreamConsumer(redis, "g", "forwarder", {other: forward}, dead_letter_stream="test:dead", block_ms=50)
    await run_consumers([main, forwarder], asyncio.Event(), burst=True, on_idle=tick)
    assert forwarded == [b"t1"]
