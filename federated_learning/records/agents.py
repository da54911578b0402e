"""The agent registry: who joined, what data they hold, when they were last heard."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from federated_learning.access import DEFAULT_ORG, DEFAULT_PROJECT
from federated_learning.bus.replies import text
from federated_learning.coordination.selection import eligible_agents
from federated_learning.monitoring.reliability import AgentStats
from federated_learning.protocol.agents import AgentRecord
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import AgentJoined, AgentLeft, Heartbeat
from federated_learning.records.join_tokens import JoinTokens


@dataclass(frozen=True)
class RegistryOutcome:
    """What applying an agent message did: an event to report, or a rejection reason."""

    event: str | None = None
    rejected: str | None = None
    detail: str = ""


OPEN_REGISTRATION = "open"
"""The credential that first joins without a join token count against (all of them together)."""

FIRST_JOIN_WINDOW_S = 60


def join_credential(join_token: str | None) -> str:
    """What a first join's rate is counted by: its join token (hashed: the counter's key must not
    hold the secret), or open registration as a whole."""
    if join_token is None:
        return OPEN_REGISTRATION
    return "token-" + hashlib.sha256(join_token.encode()).hexdigest()[:24]


class AgentRegistry:
    def __init__(self, redis: aioredis.Redis, keys: Keys, heartbeat_timeout_s: float,
                 *, require_join_token: bool = False, max_first_joins_per_minute: int | None = None,
                 cache_records: bool = False) -> None:
        self._redis = redis
        self._cache: dict[str, AgentRecord] | None = {} if cache_records else None
        """With ``cache_records`` (the registry's one writer, the coordinator), the records read or
        written, kept: a record changes only through ``apply``, so a hit is current."""
        self._keys = keys
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.require_join_token = require_join_token
        self.max_first_joins_per_minute = max_first_joins_per_minute
        self.tokens = JoinTokens(redis, keys)

    async def _first_join_allowed(self, credential: str, now: float) -> bool:
        """Count one first join against ``credential``'s current minute; False past the limit."""
        if self.max_first_joins_per_minute is None:
            return True
        key = self._keys.first_joins(credential, int(now // FIRST_JOIN_WINDOW_S))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 2 * FIRST_JOIN_WINDOW_S)
            count, _ = await pipe.execute()
        return int(count) <= self.max_first_joins_per_minute

    async def apply(self, message: AgentJoined | Heartbeat | AgentLeft, at: float | None = None, *,
                    registered: bool | None = None) -> RegistryOutcome:
        """Apply a join, heartbeat or leave received at ``at`` (unix seconds; default now).

        ``registered``: whether the agent is known, when the caller has already looked (saves a
        round trip per heartbeat); None: look it up.

        Pass the stream entry's server timestamp as ``at``: liveness then does not depend
        on how far behind the reader is, nor on the agent's clock.
        """
        # A client may XADD with an explicit id far in the future; never believe more than now.
        now = time.time() if at is None else min(at, time.time())
        if isinstance(message, AgentJoined):
            existing = await self.get(message.agent_id)
            if existing and existing.public_key and message.public_key != existing.public_key:
                return RegistryOutcome(rejected="key_mismatch",
                                       detail="agent id is bound to another public key")
            if existing is None and not await self._first_join_allowed(join_credential(message.join_token), now):
                return RegistryOutcome(rejected="join_rate_limited",
                                       detail=f"more than {self.max_first_joins_per_minute} new agents per minute "
                                              "from one credential; the agent's next join retries")
            project = existing.project if existing else await self._first_join_project(message)
            if project is None:
                return RegistryOutcome(rejected="bad_join_token",
                                       detail="a first join needs a valid join token from the operator"
                                       if message.join_token is None else "unknown, used up or expired join token")
            record = AgentRecord(agent_id=message.agent_id, datasets=dict(message.datasets),
                                 device=dict(message.device), public_key=message.public_key,
                                 volunteer=message.volunteer,
                                 joined_at=existing.joined_at if existing else now,
                                 org_id=project[0], project_id=project[1])
            if record == existing:  # an agent's periodic re-join: only a sign of life
                await self._redis.zadd(self._keys.agents_last_seen, {message.agent_id: now}, gt=True)
                return RegistryOutcome()
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._keys.agents, message.agent_id, record.model_dump_json())
                if self._cache is not None:
                    self._cache.pop(message.agent_id, None)  # read again after the write
                if record.volunteer:
                    pipe.sadd(self._keys.agent_volunteers, message.agent_id)
                else:
                    pipe.srem(self._keys.agent_volunteers, message.agent_id)
                pipe.zadd(self._keys.agents_last_seen, {message.agent_id: now}, gt=True)
                await pipe.execute()
            sizes = ", ".join(f"{k}={v}" for k, v in message.datasets.items())
            return RegistryOutcome(event="agent_joined" if existing is None else "agent_rejoined",
                                   detail=f"datasets {sizes}")
        if not (registered if registered is not None else await self.is_registered(message.agent_id)):
            return RegistryOutcome(rejected="unknown_agent", detail=f"{message.type} before join")
        if isinstance(message, Heartbeat):
            await self._redis.zadd(self._keys.agents_last_seen, {message.agent_id: now}, gt=True)
            return RegistryOutcome()
        await self._redis.zrem(self._keys.agents_last_seen, message.agent_id)
        return RegistryOutcome(event="agent_left", detail=message.reason or "left")

    async def _first_join_project(self, message: AgentJoined) -> tuple[str, str] | None:
        """The (organisation, project) a new agent joins: its token's; the default project when
        it brings none and registration is open; None when its token is bad or one is required."""
        if message.join_token is None:
            return None if self.require_join_token else (DEFAULT_ORG, DEFAULT_PROJECT)
        token = await self.tokens.redeem(message.join_token)
        return None if token is None else (token.org_id, token.project_id)

    def forget_records(self) -> None:
        """Drop the kept records (another process may have written the registry meanwhile)."""
        if self._cache is not None:
            self._cache.clear()

    def cached(self, agent_id: str) -> AgentRecord | None:
        """The kept record of ``agent_id`` (None when not kept, or without ``cache_records``)."""
        return None if self._cache is None else self._cache.get(agent_id)

    def keep(self, records: list[AgentRecord | None]) -> None:
        if self._cache is not None:
            self._cache.update((record.agent_id, record) for record in records if record is not None)

    async def get(self, agent_id: str) -> AgentRecord | None:
        if (hit := self.cached(agent_id)) is not None:
            return hit
        raw = await self._redis.hget(self._keys.agents, agent_id)
        record = None if raw is None else AgentRecord.model_validate_json(raw)
        self.keep([record])
        return record

    async def is_registered(self, agent_id: str) -> bool:
        return bool(await self._redis.hexists(self._keys.agents, agent_id))

    async def all(self) -> list[AgentRecord]:
        raw = await self._redis.hgetall(self._keys.agents)
        return [AgentRecord.model_validate_json(v) for v in raw.values()]

    async def datasets(self, project: tuple[str, str] | None = None) -> dict[str, dict[str, int]]:
        """Datasets of the agents that can be asked for work (volunteers cannot: they have no inbox),
        only those of ``project`` (organisation, project) when one is given."""
        return {record.agent_id: record.datasets for record in await self.all()
                if not record.volunteer and (project is None or record.project == project)}

    async def eligible(self, dataset: str, project: tuple[str, str] | None = None) -> list[str]:
        """Live agents that can be asked for work on ``dataset`` (of ``project`` when given), sorted:
        reads only the live agents' records, so agents that registered and went silent cost nothing."""
        alive = await self.alive()
        datasets = {record.agent_id: record.datasets for record in await self.records(alive)
                    if not record.volunteer and (project is None or record.project == project)}
        return eligible_agents(datasets, alive, dataset)

    def stage_records(self, pipe: Pipeline, agent_ids: list[str]) -> None:
        """Queue the read of ``agent_ids``' records (see ``parse_records``)."""
        pipe.hmget(self._keys.agents, agent_ids)

    @staticmethod
    def parse_records(raw: list[bytes | None]) -> list[AgentRecord | None]:
        """The reply of ``stage_records``: each agent's record, None for an unregistered one."""
        return [None if r is None else AgentRecord.model_validate_json(r) for r in raw]

    async def records(self, agent_ids: list[str]) -> list[AgentRecord]:
        """The records of those of ``agent_ids`` that are registered (one read of those not kept)."""
        if not agent_ids:
            return []
        kept = {agent: hit for agent in agent_ids if (hit := self.cached(agent)) is not None}
        missing = [agent for agent in agent_ids if agent not in kept]
        if missing:
            read = self.parse_records(cast("list[bytes | None]", await self._redis.hmget(self._keys.agents, missing)))
            self.keep(read)
            kept.update((record.agent_id, record) for record in read if record is not None)
        return [kept[agent] for agent in agent_ids if agent in kept]

    async def last_seen(self) -> dict[str, float]:
        pairs = cast("list[tuple[bytes, float]]",
                     await self._redis.zrange(self._keys.agents_last_seen, 0, -1, withscores=True))
        return {member.decode(): float(score) for member, score in pairs}

    async def live_volunteers(self, dataset: str, project: tuple[str, str] | None = None, *,
                              indexed: Iterable[bytes | str] | None = None) -> list[str]:
        """Volunteer agents (plain-HTTP clients) holding ``dataset`` that were heard from recently
        (only those of ``project`` when one is given). ``indexed``: the volunteer index
        (``Keys.agent_volunteers``) when the caller already read it in a pipeline."""
        if indexed is None:
            indexed = await self._redis.smembers(self._keys.agent_volunteers)
        volunteers = sorted(text(v) for v in indexed)
        if not volunteers:
            return []
        seen = await self._redis.zmscore(self._keys.agents_last_seen, volunteers)
        since = time.time() - self.heartbeat_timeout_s
        alive = [agent for agent, at in zip(volunteers, seen, strict=True) if at is not None and at >= since]
        return sorted(r.agent_id for r in await self.records(alive)
                      if r.volunteer and r.datasets.get(dataset, 0) > 0 and (project is None or r.project == project))

    async def index_volunteers(self) -> None:
        """Rebuild the volunteers' index from the records (a registry written before it existed)."""
        volunteers = [r.agent_id for r in await self.all() if r.volunteer]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.agent_volunteers)
            if volunteers:
                pipe.sadd(self._keys.agent_volunteers, *volunteers)
            await pipe.execute()

    async def statistics(self) -> dict[str, AgentStats]:
        """Each registered agent's record of work: asked, completed, late, dropped, flagged, examples,
        and contribution (``Keys.agent_contributions``)."""
        counters: dict[str, int] = {}
        contributions: dict[str, float] = {}
        for cell in self._keys.cells:  # each cell counts what its partition's steps did
            for name, count in _counts(await self._redis.hgetall(cell.agent_stats)).items():
                counters[name] = counters.get(name, 0) + count
            for raw_name, value in (await self._redis.hgetall(cell.agent_contributions)).items():
                contributions[text(raw_name)] = contributions.get(text(raw_name), 0.0) + float(value)
        dropouts = _counts(await self._redis.hgetall(self._keys.agent_dropouts))
        flags = _counts(await self._redis.hgetall(self._keys.agent_flags))
        stats = {}
        for agent in await self._redis.hkeys(self._keys.agents):
            name = text(agent)
            late = counters.get(f"{name}:late", 0)
            completed = counters.get(f"{name}:completed", 0) + late
            dropped = dropouts.get(name, 0)
            examples = counters.get(f"{name}:examples", 0)
            stats[name] = AgentStats(
                asked=max(counters.get(f"{name}:asked", 0), completed + dropped), completed=completed,
                late=late, dropped=dropped, flagged=min(flags.get(name, 0), completed),
                examples=examples, contribution=contributions.get(name, 0.0))
        return stats

    async def asked_within(self, agents: list[str], seconds: float, now: float) -> dict[str, int]:
        """How many tasks each agent was given in the last ``seconds``."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for agent in agents:
                pipe.zcount(self._keys.agent_asked_at(agent), now - seconds, "+inf")
            counts = await pipe.execute()
        return {agent: int(count) for agent, count in zip(agents, counts, strict=True)}

    async def touch(self, seen: dict[str, float]) -> None:
        """Record signs of life (agent -> when), in one write; never moves an agent's time back.
        Empties ``seen``."""
        if seen:
            await self._redis.zadd(self._keys.agents_last_seen, seen, gt=True)
            seen.clear()

    async def count_alive(self) -> int:
        """How many agents were heard from within the heartbeat timeout (without reading them)."""
        return int(await self._redis.zcount(self._keys.agents_last_seen, time.time() - self.heartbeat_timeout_s, "+inf"))

    async def alive_among(self, agent_ids: list[str]) -> list[str]:
        """Those of ``agent_ids`` heard from within the heartbeat timeout: one read, whatever the registry's size."""
        if not agent_ids:
            return []
        since = time.time() - self.heartbeat_timeout_s
        seen = await self._redis.zmscore(self._keys.agents_last_seen, agent_ids)
        return [agent for agent, at in zip(agent_ids, seen, strict=True) if at is not None and at >= since]

    async def alive(self) -> list[str]:
        """Agents heard from within the heartbeat timeout, sorted."""
        since = time.time() - self.heartbeat_timeout_s
        members = cast("list[bytes]",
                       await self._redis.zrangebyscore(self._keys.agents_last_seen, since, "+inf"))
        return sorted(m.decode() for m in members)


def _counts(raw: Mapping[bytes | str, bytes | str]) -> dict[str, int]:
    return {text(key): int(value) for key, value in raw.items()}


def entry_time(entry_id: bytes) -> float:
    """The server time (unix seconds) at which a stream entry was added, from its id."""
    return int(entry_id.split(b"-", 1)[0]) / 1000.0
