"""The messages of a round's secure exchange, as stored in Redis (one hash per phase and
session attempt, agent id -> message JSON; a hash of advertised public key -> agent)."""

from __future__ import annotations

from typing import TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.asyncio.client import Pipeline

from federated_learning.bus.replies import text
from federated_learning.coordination.secure import SecurePhase
from federated_learning.coordination.secure_exchange import PART_OF, PHASE_OF
from federated_learning.coordination.state import TrainingState
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.secure_messages import SecureAgentMessage, SecureKeysAdvertised

M = TypeVar("M", bound=BaseModel)

EXCHANGE_TTL_S = 24 * 3600


class SecureExchange:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    def _part(self, state: TrainingState, phase: SecurePhase) -> str:
        assert state.secure is not None
        return self.keys.secure_exchange(state.training_id, state.round, state.secure.attempt, PART_OF[phase])

    def _key_owners(self, state: TrainingState) -> str:
        """Hash public key -> the agent that advertised it in this session (repeats are refused
        in O(1), not by reading every advertisement)."""
        assert state.secure is not None
        return self.keys.secure_exchange(state.training_id, state.round, state.secure.attempt, "key_owners")

    async def key_owners(self, state: TrainingState, message: SecureAgentMessage) -> dict[str, str | None]:
        """For an advertisement in the current session: who advertised each of its keys before."""
        if not isinstance(message, SecureKeysAdvertised) or state.secure is None:
            return {}
        keys = [message.cipher_public_key, message.mask_public_key]
        owners = await self.redis.hmget(self._key_owners(state), keys)
        return {key: None if owner is None else text(owner) for key, owner in zip(keys, owners, strict=True)}

    def stage_store(self, pipe: Pipeline, state: TrainingState, message: SecureAgentMessage) -> None:
        part = self._part(state, PHASE_OF[message.type])
        pipe.hsetnx(part, message.agent_id, message.model_dump_json())  # a redelivery counts once
        pipe.expire(part, EXCHANGE_TTL_S)
        if isinstance(message, SecureKeysAdvertised):
            owners = self._key_owners(state)
            pipe.hsetnx(owners, message.cipher_public_key, message.agent_id)
            pipe.hsetnx(owners, message.mask_public_key, message.agent_id)
            pipe.expire(owners, EXCHANGE_TTL_S)

    async def count(self, state: TrainingState) -> int:
        """Answers of the current phase (masked uploads are the round's accepted updates)."""
        assert state.secure is not None
        if state.secure.phase is SecurePhase.MASKED:
            return int(await self.redis.hlen(self.keys.round_updates(state.training_id, state.round)))
        return int(await self.redis.hlen(self._part(state, state.secure.phase)))

    async def stored(self, state: TrainingState, phase: SecurePhase, model: type[M]) -> list[M]:
        raw = await self.redis.hvals(self._part(state, phase))
        return sorted((model.model_validate_json(v) for v in raw), key=lambda m: getattr(m, "agent_id", ""))

    async def uploaders(self, state: TrainingState) -> list[str]:
        return sorted(text(agent) for agent in
                      await self.redis.hkeys(self.keys.round_updates(state.training_id, state.round)))
