"""A lease in Redis: at most one holder at a time does a job (the coordinator's, say).

The holder takes the key with SET NX PX and renews it, by Lua, only while it still holds it.
It counts its own lease as valid for ``ttl`` minus a margin from the moment it sent the
renewal (its monotonic clock), so it stops working before the key can expire and another
process take it: a holder that cannot renew (a lost bus, a long pause) gives the work up on
its own.

A process frozen between that check and its write for longer than the margin (a tenth of the
ttl, at least 500 ms) is stopped by the epoch: every take of the lease increments
``<key>:epoch``, and the holder's transactions are fenced (:meth:`Lease.fence`): they WATCH the
epoch and check it is still the one this process took, so EXEC fails once another process (or a
restart of this one) took the lease since.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError

from federated_learning.bus.consumer import StopConsuming

log = logging.getLogger(__name__)

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_ACQUIRE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
   or (ARGV[3] == '1' and redis.call('GET', KEYS[1]) == ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return redis.call('INCR', KEYS[2])
end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseLost(StopConsuming):
    """The holder's lease ran out (or another process holds it): stop working."""


class Lease:
    def __init__(self, redis: aioredis.Redis, key: str, holder: str, *, ttl_s: float = 10.0) -> None:
        if ttl_s <= 1.0:
            raise ValueError(f"a lease needs a ttl above 1 s; got {ttl_s}")
        self._redis = redis
        self.key = key
        self.holder = holder
        self.ttl_ms = int(ttl_s * 1000)
        self.margin_s = max(0.5, ttl_s / 10)
        self.epoch_key = f"{key}:epoch"
        """Incremented by every take of the lease (its hash tag, if any, is the lease key's)."""
        self.epoch = 0
        """The epoch of this process's take; 0 before the first."""
        self._superseded = False
        """Another take moved the epoch past ours: a process under our name (a restart) may hold
        the lease now, so we no longer take it back by name, only once it is free."""
        self._valid_until = 0.0

    @property
    def renew_every_s(self) -> float:
        return self.ttl_ms / 1000 / 4

    def valid(self) -> bool:
        """Whether this process may still act as the holder (by its own clock)."""
        return time.monotonic() < self._valid_until

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless :meth:`valid`."""
        if not self.valid():
            raise LeaseLost(f"lease {self.key} of {self.holder} ran out")

    async def acquire(self) -> bool:
        """Take the lease when nobody holds it, or take it back when it is in this holder's name
        (a restart), unless this process was fenced out since; either way as a new epoch."""
        sent = time.monotonic()
        epoch = int(await self._redis.eval(_ACQUIRE_LUA, 2, self.key, self.epoch_key, self.holder,
                                           str(self.ttl_ms), "0" if self._superseded else "1"))
        if not epoch:
            return False
        self.epoch, self._superseded = epoch, False
        self._valid_until = sent + self.ttl_ms / 1000 - self.margin_s
        return True

    async def fence(self, pipe: Pipeline) -> None:
        """Start ``pipe``'s transaction fenced by the lease: WATCH the epoch, check it is this
        process's, then MULTI. Raises :class:`LeaseLost` when it is not (the caller resets
        ``pipe``); the transaction's EXEC fails (see :meth:`execute`) when another process takes
        the lease before it."""
        self.check()
        await pipe.watch(self.epoch_key)
        now = await pipe.get(self.epoch_key)
        if int(now or 0) != self.epoch:
            self._valid_until, self._superseded = 0.0, True
            raise LeaseLost(f"lease {self.key} was taken by another holder (epoch {int(now or 0)}, "
                            f"{self.holder} took {self.epoch})")
        pipe.multi()  # type: ignore[no-untyped-call]

    async def execute(self, pipe: Pipeline) -> list[object]:
        """EXEC a transaction :meth:`fence` started; :class:`LeaseLost` when the epoch moved.

        A watched connection that drops also fails the EXEC (redis-py raises WatchError): then
        the epoch is read again, and an unmoved one makes it the connection error it was.
        """
        try:
            return await pipe.execute()
        except WatchError as exc:
            now = int(await self._redis.get(self.epoch_key) or 0)
            if now == self.epoch:
                raise RedisConnectionError(f"a transaction fenced by lease {self.key} was not run "
                                           "(its connection dropped); the lease is still held") from exc
            self._valid_until, self._superseded = 0.0, True
            raise LeaseLost(f"lease {self.key} was taken by another holder before {self.holder} "
                            "wrote") from exc

    async def renew(self, sent: float | None = None) -> bool:
        """Extend the lease while this process holds it; False (and not valid) when it does not
        (or when a process under the same name took it since)."""
        sent = time.monotonic() if sent is None else sent
        if not self._superseded and int(await self._redis.eval(_RENEW_LUA, 1, self.key, self.holder, str(self.ttl_ms))):
            self._valid_until = sent + self.ttl_ms / 1000 - self.margin_s
            return True
        self._valid_until = 0.0
        return False

    async def release(self) -> None:
        """Give the lease up now (on a clean stop), so a standby takes over without waiting."""
        self._valid_until = 0.0
        if not self._superseded:  # else the key, under our name, is a restart's
            await self._redis.eval(_RELEASE_LUA, 1, self.key, self.holder)

    async def keep(self, lost: asyncio.Event, stop: asyncio.Event) -> None:
        """Renew until ``stop``; set ``lost`` (and return) once the lease cannot be kept valid."""
        # asyncio.timeout rather than wait_for: on Python 3.11 wait_for can lose a cancellation
        # that meets a finishing renewal, and a keeper that outlives its holder renews for nobody.
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.renew_every_s):
                    held = await self.renew()
            except (TimeoutError, OSError, aioredis.RedisError) as exc:
                log.warning("renewing lease %s failed: %s", self.key, exc)
                held = self.valid()
            if not held or not self.valid():
                lost.set()
                return
            try:
                async with asyncio.timeout(self.renew_every_s):
                    await stop.wait()
            except TimeoutError:
                continue
