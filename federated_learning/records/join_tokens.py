"""Join tokens: what an operator hands to new agents when registration is closed.

Only the SHA-256 of a token is stored; the token itself is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import secrets
import time

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from federated_learning.protocol.keys import Keys

TOKEN_BYTES = 24


class JoinToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token_id: str
    label: str = ""
    uses_left: int | None = Field(default=None, ge=0, description="None: unlimited")
    created_at: float = Field(default_factory=time.time)


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JoinTokens:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def create(self, label: str = "", max_uses: int | None = None) -> tuple[str, JoinToken]:
        """A new token (returned once) and its stored record."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        record = JoinToken(token_id=token_id(token), label=label, uses_left=max_uses)
        await self._redis.hset(self._keys.join_tokens, record.token_id, record.model_dump_json())
        return token, record

    async def redeem(self, token: str) -> bool:
        """Use the token once; False when it is unknown, revoked or used up.

        WATCH/MULTI makes concurrent redemptions of the last use fail rather than both pass.
        """
        key, field = self._keys.join_tokens, token_id(token)
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.hget(key, field)
            if raw is None:
                return False
            record = JoinToken.model_validate_json(raw)
            if record.uses_left == 0:
                return False
            pipe.multi()  # type: ignore[no-untyped-call]
            if record.uses_left is not None:
                pipe.hset(key, field, record.model_copy(update={"uses_left": record.uses_left - 1}).model_dump_json())
            await pipe.execute()
        return True

    async def revoke(self, token_id_: str) -> bool:
        return bool(await self._redis.hdel(self._keys.join_tokens, token_id_))

    async def all(self) -> list[JoinToken]:
        raw = await self._redis.hgetall(self._keys.join_tokens)
        return sorted((JoinToken.model_validate_json(v) for v in raw.values()), key=lambda t: t.created_at)
