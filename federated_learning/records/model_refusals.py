"""Agents (and HTTP clients) whose model is not the training's, with the reason, per training.

Written by the coordinator (an agent's ``ModelRefused``, a first agent's unusable parameters)
and by the HTTP gateway (a ``/sync_model`` body of another layout); read by the training's
REST status, so the operator sees why an agent does not take part, not only the agent's log.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from federated_learning.protocol.keys import Keys

MAX_REFUSALS_SHOWN = 100
MAX_REFUSALS_KEPT = 1000
"""Agents whose refusal a training keeps: the rest are counted as rejected inputs only."""


class ModelRefusal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    agent_id: str
    reason: str
    detail: str
    source: str = Field(description="'agent' (the agent refused the model) or 'coordinator'/'sync' "
                                    "(the server refused the agent's model)")
    at: float = Field(default_factory=time.time)


class ModelRefusals:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def add(self, training_id: str, refusal: ModelRefusal) -> bool:
        """Keep the newest refusal per agent, for at most ``MAX_REFUSALS_KEPT`` agents; True when it
        is news (a first refusal of this agent, or another reason) and should be reported."""
        key = self._keys.model_refusals(training_id)
        raw = await self._redis.hget(key, refusal.agent_id)
        if raw is None and await self._redis.hlen(key) >= MAX_REFUSALS_KEPT:
            return False
        await self._redis.hset(key, refusal.agent_id, refusal.model_dump_json())
        return raw is None or ModelRefusal.model_validate_json(raw).reason != refusal.reason

    async def list(self, training_id: str) -> list[ModelRefusal]:
        """The newest refusals first, at most ``MAX_REFUSALS_SHOWN``."""
        raw = await self._redis.hvals(self._keys.model_refusals(training_id))
        refusals = sorted((ModelRefusal.model_validate_json(v) for v in raw), key=lambda r: -r.at)
        return refusals[:MAX_REFUSALS_SHOWN]
