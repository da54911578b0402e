"""A lease in Redis: at most one holder at a time does a job (the coordinator's, say).

The holder takes the key with SET NX PX and renews it, by Lua, only while it still holds it.
It counts its own lease as valid for ``ttl`` minus a margin from the moment it sent the
renewal (its monotonic clock), so it stops working before the key can expire and another
process take it: a holder that cannot renew (a lost bus, a long pause) gives the work up on
its own. What this cannot cover is a process frozen between checking :meth:`Lease.valid` and
its next write for longer than the margin; the margin is a tenth of the ttl, at least 500 ms.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

from federated_learning.bus.consumer import StopConsuming

log = logging.getLogger(__name__)

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
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
        """Take the lease when nobody holds it (or renew it when this process does)."""
        sent = time.monotonic()
        if await self._redis.set(self.key, self.holder, nx=True, px=self.ttl_ms):
            self._valid_until = sent + self.ttl_ms / 1000 - self.margin_s
            return True
        return await self.renew(sent)

    async def renew(self, sent: float | None = None) -> bool:
        """Extend the lease while this process holds it; False (and not valid) when it does not."""
        sent = time.monotonic() if sent is None else sent
        if int(await self._redis.eval(_RENEW_LUA, 1, self.key, self.holder, str(self.ttl_ms))):
            self._valid_until = sent + self.ttl_ms / 1000 - self.margin_s
            return True
        self._valid_until = 0.0
        return False

    async def release(self) -> None:
        """Give the lease up now (on a clean stop), so a standby takes over without waiting."""
        self._valid_until = 0.0
        await self._redis.eval(_RELEASE_LUA, 1, self.key, self.holder)

    async def keep(self, lost: asyncio.Event, stop: asyncio.Event) -> None:
        """Renew until ``stop``; set ``lost`` (and return) once the lease cannot be kept valid."""
        while not stop.is_set():
            try:
                held = await asyncio.wait_for(self.renew(), timeout=self.renew_every_s)
            except (TimeoutError, OSError, aioredis.RedisError) as exc:
                log.warning("renewing lease %s failed: %s", self.key, exc)
                held = self.valid()
            if not held or not self.valid():
                lost.set()
                return
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.renew_every_s)
            except TimeoutError:
                continue
