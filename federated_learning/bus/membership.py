"""Which processes of one kind are alive: each signs in to a sorted set under the server's clock.

Every coordinator process beats (:meth:`Membership.beat`) a few times per lease; each beat sets
the member's expiry to the server's time plus the member's own ttl, and the members are those not
expired (so processes with different ttls do not drop each other early). Times come from the
server (Lua ``TIME``), so the processes' own clocks may differ; every process reads the same set and so derives the same
assignment of partitions (``coordination/partitions.py``).
"""

from __future__ import annotations

import redis.asyncio as aioredis

from federated_learning.bus.replies import text

_BEAT_LUA = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ms)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


class Membership:
    """One process's sign of life in a set of processes of its kind."""

    def __init__(self, redis: aioredis.Redis, key: str, name: str, *, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"a membership needs a positive ttl; got {ttl_s}")
        self._redis = redis
        self.key = key
        self.name = name
        self.ttl_ms = int(ttl_s * 1000)
        self.members: tuple[str, ...] = ()
        """The members at the last beat, in name order (this process among them)."""

    async def beat(self) -> tuple[str, ...]:
        """Sign in (again) for the ttl, drop expired members, and return the live ones."""
        return await self._run(self.name)

    async def look(self) -> tuple[str, ...]:
        """The live members, without signing in."""
        return await self._run("")

    async def leave(self) -> None:
        """Sign out now (a clean stop), so others take over without waiting for the ttl."""
        await self._redis.zrem(self.key, self.name)
        self.members = tuple(m for m in self.members if m != self.name)

    async def _run(self, name: str) -> tuple[str, ...]:
        raw = await self._redis.eval(_BEAT_LUA, 1, self.key, name, str(self.ttl_ms))
        self.members = tuple(sorted(text(member) for member in raw))
        return self.members
