"""Consumer-group loop: read, handle, acknowledge; claim what dead consumers left.

Semantics (at least once):
- a handler returns normally once its effect is durable; only then is the entry acked;
- a handler that raises leaves the entry pending; it is retried, and after
  ``max_deliveries`` failures moved to the dead-letter stream and acked;
- on start the consumer first re-handles its own pending entries (same consumer
  name after a restart), then periodically claims entries idle longer than
  ``claim_idle_ms`` from other consumers (XAUTOCLAIM);
- an entry whose id its writer chose (beyond the server's clock, see
  :mod:`federated_learning.bus.stream_ids`) is never handled: the stream is repaired (the forged
  entry deleted, later ones moved to server ids) and the repair reported; every few seconds the
  consumer also checks its streams' last ids, so a stream is repaired even behind a backlog;
- a bus error (lost connection, a refused command) never ends the loop: it backs off and goes on;
- a handler that raises :class:`StopConsuming` leaves its entry pending, uncounted, and ends the
  loop (its process lost the right to handle entries, e.g. a lease);
- a stream may have a batch handler: the new entries of one read are handed over together and
  acked in one command once it returns; when it raises, each entry is handled again on its own
  (so one bad entry is retried, counted and dead-lettered alone, as without batching).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from federated_learning.bus.replies import group_batches, text
from federated_learning.bus.stream_ids import (
    SUSPECT_AFTER_MS,
    StreamRepair,
    id_order,
    is_beyond,
    now_ms,
    repair_stream,
)

log = logging.getLogger(__name__)

Fields = dict[bytes, bytes]
Handler = Callable[[bytes, Fields], Awaitable[None]]
BatchHandler = Callable[[list[tuple[bytes, Fields]]], Awaitable[None]]
ForgedIdReporter = Callable[[StreamRepair], Awaitable[None]]

MAX_DELIVERIES = 5
CLAIM_EVERY_S = 2.0
GUARD_EVERY_S = 2.0
"""How often (seconds) a consumer checks its streams' last ids for a forged one."""
RECONNECT_BACKOFF_CAP_S = 5.0
RETRY_DELAY_S = 0.5
"""A failed entry is retried after this many seconds times its failure count."""


async def ensure_group(redis: aioredis.Redis, stream: str, group: str, *, start_id: str = "0") -> None:
    """Create ``group`` on ``stream`` (and the stream); an existing group is fine.

    Raises ``TypeError`` when the key exists with another type: we refuse to delete it.
    """
    try:
        await redis.xgroup_create(stream, group, id=start_id, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return
        if "WRONGTYPE" in str(exc):
            raise TypeError(
                f"key '{stream}' exists and is not a stream; refusing to delete it"
            ) from exc
        raise


class StopConsuming(Exception):
    """Raised by a handler that must not handle entries any more: the entry stays pending for
    whoever takes over, is not counted as a failure, and :meth:`StreamConsumer.run` returns."""


@dataclass
class ConsumerStats:
    handled: int = 0
    failed: int = 0
    claimed: int = 0
    dead_lettered: int = 0
    forged_ids: int = 0
    bus_errors: int = 0


class StreamConsumer:
    """One consumer in one group over one or more streams, handled one entry at a time."""

    def __init__(
        self,
        redis: aioredis.Redis,
        group: str,
        consumer: str,
        handlers: Mapping[str, Handler],
        *,
        dead_letter_stream: str,
        block_ms: int = 500,
        count: int = 32,
        claim_idle_ms: int = 15_000,
        max_deliveries: int = MAX_DELIVERIES,
        on_forged_id: ForgedIdReporter | None = None,
        batch_handlers: Mapping[str, BatchHandler] | None = None,
    ) -> None:
        self._redis = redis
        self.group = group
        self.consumer = consumer
        self._handlers = dict(handlers)
        self._batch_handlers = dict(batch_handlers or {})
        if unknown := set(self._batch_handlers) - set(self._handlers):
            raise ValueError(f"batch handlers need a per-entry handler too: {sorted(unknown)}")
        self._dead_letter = dead_letter_stream
        self.block_ms = block_ms
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self._failures: dict[tuple[str, bytes], int] = {}
        self._on_forged_id = on_forged_id
        self._last_claim = 0.0
        self._last_guard = 0.0
        self._retry_at = 0.0
        self.stats = ConsumerStats()

    @property
    def streams(self) -> tuple[str, ...]:
        """The streams this consumer reads, in the order a read's entries are handled."""
        return tuple(self._handlers)

    async def setup(self) -> None:
        for stream in self._handlers:
            await ensure_group(self._redis, stream, self.group)

    async def _deliveries(self, stream: str, entry_id: bytes) -> int:
        """How often the server has delivered this entry to the group (survives restarts)."""
        pending = await self._redis.xpending_range(stream, self.group, min=entry_id, max=entry_id, count=1)
        return int(pending[0]["times_delivered"]) if pending else 0

    async def _dead_letter_entry(self, stream: str, entry_id: bytes, fields: Fields) -> None:
        await self._redis.xadd(
            self._dead_letter,
            {b"stream": stream.encode(), b"id": entry_id, b"group": self.group.encode(),
             **fields},  # type: ignore[dict-item]
            maxlen=10_000,
            approximate=True,
        )
        await self._redis.xack(stream, self.group, entry_id)
        self._failures.pop((stream, entry_id), None)
        self.stats.dead_lettered += 1

    async def _report_repair(self, repair: StreamRepair) -> None:
        self.stats.forged_ids += 1
        log.warning("%s/%s repaired %s: %s", self.group, self.consumer, repair.stream, repair.describe())
        if self._on_forged_id is not None:
            await self._on_forged_id(repair)

    async def _genuine(self, stream: str, entry_id: bytes) -> bool:
        """Whether ``entry_id`` may be handled: an id far ahead of this clock makes the server
        repair the stream (when the id is beyond its own clock) and say whether the entry is
        still there under that id (a deleted or moved entry was acknowledged by the repair)."""
        if not is_beyond(entry_id, now_ms(), SUSPECT_AFTER_MS):
            return True
        outcome = await repair_stream(self._redis, stream, entry_id)
        if outcome.repair is not None:
            await self._report_repair(outcome.repair)
        return outcome.entry_exists

    async def guard_streams(self) -> int:
        """Repair any of this consumer's streams whose last id was forged; returns how many."""
        self._last_guard = time.monotonic()
        repaired = 0
        for stream in self._handlers:
            outcome = await repair_stream(self._redis, stream)
            if outcome.repair is not None:
                await self._report_repair(outcome.repair)
                repaired += 1
        return repaired

    async def _handle(self, stream: str, entry_id: bytes, fields: Fields, *, redelivered: bool = False) -> None:
        key = (stream, entry_id)
        if not await self._genuine(stream, entry_id):
            self._failures.pop(key, None)
            return
        if redelivered and await self._deliveries(stream, entry_id) > self.max_deliveries:
            # Delivered again and again without an ack, e.g. it kills the process that handles it.
            log.error("%s entry %s delivered more than %d times; dead-lettered unhandled",
                      stream, entry_id.decode(), self.max_deliveries)
            await self._dead_letter_entry(stream, entry_id, fields)
            return
        try:
            await self._handlers[stream](entry_id, fields)
        except (RedisConnectionError, RedisTimeoutError, StopConsuming):
            raise
        except Exception:
            self._failures[key] = self._failures.get(key, 0) + 1
            self.stats.failed += 1
            self._retry_at = time.monotonic() + RETRY_DELAY_S * self._failures[key]
            log.exception(
                "handler for %s entry %s failed (%d/%d)",
                stream, entry_id.decode(), self._failures[key], self.max_deliveries,
            )
            if self._failures[key] >= self.max_deliveries:
                await self._dead_letter_entry(stream, entry_id, fields)
            return
        await self._redis.xack(stream, self.group, entry_id)
        self._failures.pop((stream, entry_id), None)
        self.stats.handled += 1

    async def _read(self, start_id: str, block_ms: int | None) -> int:
        """Read and handle one batch; returns how many entries were handled."""
        reply = await self._redis.xreadgroup(
            self.group,
            self.consumer,
            {stream: start_id for stream in self._handlers},
            count=self.count,
            block=block_ms,
        )
        seen = 0
        for stream_name, entries in group_batches(reply):
            stream = text(stream_name)
            if start_id == ">" and stream in self._batch_handlers and len(entries) > 1:
                seen += await self._handle_batch(stream, entries)
                continue
            for entry_id, fields in entries:
                if fields is None:  # deleted while pending
                    await self._redis.xack(stream, self.group, entry_id)
                    continue
                await self._handle(stream, entry_id, fields, redelivered=start_id != ">")
                seen += 1
        return seen

    async def _handle_batch(self, stream: str, entries: list[tuple[bytes, Fields | None]]) -> int:
        """Hand new entries to the stream's batch handler and ack them in one command; when the
        handler fails, handle each entry on its own (its effects are idempotent, as for a redelivery)."""
        batch = [(entry_id, fields) for entry_id, fields in entries
                 if fields is not None and await self._genuine(stream, entry_id)]
        if batch:
            try:
                await self._batch_handlers[stream](batch)
            except (RedisConnectionError, RedisTimeoutError, StopConsuming):
                raise
            except Exception:
                log.exception("batch handler for %d %s entries failed; handling them one by one", len(batch), stream)
                for entry_id, fields in batch:
                    await self._handle(stream, entry_id, fields)
                return len(batch)
            await self._redis.xack(stream, self.group, *(entry_id for entry_id, _ in batch))
            self.stats.handled += len(batch)
        return len(batch)

    async def _claim_idle(self) -> int:
        """XAUTOCLAIM entries idle for ``claim_idle_ms`` from any consumer; handle them."""
        self._last_claim = time.monotonic()
        seen = 0
        for stream in self._handlers:
            cursor: bytes | str = "0-0"
            while True:
                reply = await self._redis.xautoclaim(
                    stream, self.group, self.consumer, self.claim_idle_ms, start_id=cursor, count=self.count
                )
                cursor, entries = reply[0], reply[1]
                for entry_id, fields in entries:
                    if fields is None:
                        continue
                    self.stats.claimed += 1
                    await self._handle(stream, entry_id, fields, redelivered=True)
                    seen += 1
                if cursor in (b"0-0", "0-0"):
                    break
        return seen

    async def drain_own_pending(self) -> int:
        """Re-handle this consumer's pending entries (after a restart); returns the count.

        Terminates: an entry either gets acked or, after ``max_deliveries`` failures,
        dead-lettered and acked.
        """
        total = 0
        while (handled := await self._read("0", None)) > 0:
            total += handled
        return total

    async def poll_once(self) -> int:
        """Claim if due, then read new entries (blocking up to ``block_ms``)."""
        handled = 0
        if time.monotonic() - self._last_guard >= GUARD_EVERY_S:
            await self.guard_streams()
        if time.monotonic() - self._last_claim >= CLAIM_EVERY_S:
            handled += await self._claim_idle()
        handled += await self._read(">", self.block_ms)
        if self._failures and time.monotonic() >= self._retry_at:
            handled += await self._read("0", None)
        return handled

    async def run(self, stop: asyncio.Event, *, burst: bool = False,
                  on_idle: Callable[[], Awaitable[None]] | None = None) -> None:
        """Loop until ``stop`` is set (or, with ``burst``, until nothing is left to read).

        Bus errors (a lost connection, a refused command) are logged and retried with backoff;
        a missing group (NOGROUP: the stream was deleted) is created again.
        """
        ready = False
        backoff = 0.1
        while not stop.is_set():
            try:
                if not ready:
                    await self.setup()
                    await self.drain_own_pending()
                    ready = True
                handled = await self.poll_once()
                if on_idle is not None:
                    await on_idle()
                backoff = 0.1
            except StopConsuming as exc:
                log.warning("%s/%s stops consuming: %s", self.group, self.consumer, exc)
                return
            except (RedisError, OSError) as exc:
                self.stats.bus_errors += 1
                lost = isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError))
                log.log(logging.WARNING if lost else logging.ERROR, "bus %s in %s/%s (%s); retrying in %.1fs",
                        "connection lost" if lost else "error", self.group, self.consumer, exc, backoff)
                ready = ready and "NOGROUP" not in str(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_CAP_S)
                continue
            if burst and handled == 0:
                if not self._failures:
                    return
                await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))


async def trim_consumed(redis: aioredis.Redis, stream: str, *groups: str) -> bool:
    """Drop entries every consumer of each of ``groups`` has handled and acknowledged (XTRIM
    MINID, approximate).

    A group's trim point is the older of its last-delivered id and its oldest pending entry, so
    nothing unread or unacknowledged goes; the stream is trimmed to the oldest of the groups'
    points. Returns False (and trims nothing) when the stream or one of the groups does not exist yet.
    """
    try:
        infos = {text(g["name"]): g for g in await redis.xinfo_groups(stream)}
    except ResponseError:
        return False
    if not groups or any(group not in infos for group in groups):
        return False
    points = []
    for group in groups:
        info = infos[group]
        point = id_order(info["last-delivered-id"])
        if int(info["pending"]) > 0:
            oldest = (await redis.xpending(stream, group))["min"]
            if oldest is not None:
                point = min(point, id_order(oldest))
        points.append(point)
    safe = min(points)
    await redis.xtrim(stream, minid=f"{safe[0]}-{safe[1]}", approximate=True)
    return True


async def run_consumers(consumers: list[StreamConsumer], stop: asyncio.Event, *, burst: bool = False,
                        on_idle: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run several consumers (one per cell's hash slot: a cluster reads the streams of one slot
    per command) until ``stop`` is set; the first also runs ``on_idle``. Outside ``burst`` mode
    one consumer that ends (it raised :class:`StopConsuming`) ends them all, and one that fails
    cancels the others and its exception propagates. In ``burst`` mode they run again until two
    passes in a row handled nothing: one may write what another reads, and ``on_idle`` may write in
    a pass that read nothing, for the next pass to read. (A burst ends once the work does: an
    ``on_idle`` that wrote something to read in every quiet pass would keep it going.)"""
    if len(consumers) == 1:
        await consumers[0].run(stop, burst=burst, on_idle=on_idle)
        return
    if burst:
        quiet_passes = 0
        while not stop.is_set() and quiet_passes < 2:
            before = sum(consumer.stats.handled for consumer in consumers)
            await _together(consumers, stop, burst=True, on_idle=on_idle)
            quiet = sum(consumer.stats.handled for consumer in consumers) == before
            quiet_passes = quiet_passes + 1 if quiet else 0
        return
    await _together(consumers, stop, burst=False, on_idle=on_idle)


async def _together(consumers: list[StreamConsumer], stop: asyncio.Event, *, burst: bool,
                    on_idle: Callable[[], Awaitable[None]] | None) -> None:
    ended = asyncio.Event()

    async def run_one(index: int, consumer: StreamConsumer) -> None:
        try:
            await consumer.run(ended, burst=burst, on_idle=on_idle if index == 0 else None)
        finally:
            if not burst:
                ended.set()

    async def follow_stop() -> None:
        await stop.wait()
        ended.set()

    follower = asyncio.create_task(follow_stop())
    tasks = [asyncio.create_task(run_one(index, consumer)) for index, consumer in enumerate(consumers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        follower.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(follower, *tasks, return_exceptions=True)
