"""Join tokens: what an operator hands to new agents when registration is closed.

Only the SHA-256 of a token is stored; the token itself is shown once, at creation.
A token is issued for one project: an agent that joins with it belongs to that project
and is only ever selected for (and only has updates accepted into) that project's trainings.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import WatchError

from federated_learning.access import DEFAULT_ORG, DEFAULT_PROJECT, is_expired
from federated_learning.protocol.keys import Keys

TOKEN_BYTES = 24
REDEEM_ATTEMPTS = 20
"""Tries of a redemption whose transaction other changes of the token hash keep aborting."""


class JoinToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token_id: str
    label: str = ""
    uses_left: int | None = Field(default=None, ge=0, description="None: unlimited")
    created_at: float = Field(default_factory=time.time)
    org_id: str = DEFAULT_ORG
    project_id: str = DEFAULT_PROJECT
    expires_at: float | None = Field(default=None, description="unix seconds; None: never")

    @property
    def redeemable(self) -> bool:
        return self.uses_left != 0 and not is_expired(self.expires_at)


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JoinTokens:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def create(self, label: str = "", max_uses: int | None = None, *, org_id: str = DEFAULT_ORG,
                     project_id: str = DEFAULT_PROJECT, ttl_s: float | None = None) -> tuple[str, JoinToken]:
        """A new token for one project (returned once) and its stored record; ``ttl_s``: seconds it stays valid."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        record = JoinToken(token_id=token_id(token), label=label, uses_left=max_uses, org_id=org_id,
                           project_id=project_id, expires_at=None if ttl_s is None else time.time() + ttl_s)
        await self.forget(lambda t: is_expired(t.expires_at))
        await self._redis.hset(self._keys.join_tokens, record.token_id, record.model_dump_json())
        return token, record

    async def forget(self, which: Callable[[JoinToken], bool]) -> int:
        """Delete the tokens ``which`` selects (expired ones, a deleted project's); returns how many."""
        raw = await self._redis.hgetall(self._keys.join_tokens)
        doomed = [field for field, value in raw.items() if which(JoinToken.model_validate_json(value))]
        return int(await self._redis.hdel(self._keys.join_tokens, *doomed)) if doomed else 0

    async def redeem(self, token: str) -> JoinToken | None:
        """Use the token once; its record (naming the project) or None when it is unknown,
        revoked, expired or used up.

        WATCH/MULTI makes concurrent redemptions of the last use fail rather than both pass; a
        transaction aborted by another change of the token hash is retried.
        """
        for _attempt in range(REDEEM_ATTEMPTS - 1):
            with contextlib.suppress(WatchError):
                return await self._redeem_once(token)
        return await self._redeem_once(token)

    async def _redeem_once(self, token: str) -> JoinToken | None:
        key, field = self._keys.join_tokens, token_id(token)
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.hget(key, field)
            if raw is None:
                return None
            record = JoinToken.model_validate_json(raw)
            if not record.redeemable:
                return None
            pipe.multi()  # type: ignore[no-untyped-call]
            if record.uses_left is not None:
                record = record.model_copy(update={"uses_left": record.uses_left - 1})
                if record.uses_left == 0 and record.expires_at is not None:
                    pipe.hdel(key, field)  # a used-up one-off token (the HTTP gateway's) is not kept
                else:
                    pipe.hset(key, field, record.model_dump_json())
            await pipe.execute()
        return record

    async def revoke(self, token_id_: str, org_id: str | None = None) -> bool:
        """Delete a token; False when it is unknown or (with ``org_id``) of another organisation."""
        if org_id is not None:
            raw = await self._redis.hget(self._keys.join_tokens, token_id_)
            if raw is None or JoinToken.model_validate_json(raw).org_id != org_id:
                return False
        return bool(await self._redis.hdel(self._keys.join_tokens, token_id_))

    async def all(self, org_id: str | None = None) -> list[JoinToken]:
        """Tokens of one organisation (all when ``org_id`` is None), oldest first; expired ones are deleted."""
        await self.forget(lambda t: is_expired(t.expires_at))
        raw = await self._redis.hgetall(self._keys.join_tokens)
        records = (JoinToken.model_validate_json(v) for v in raw.values())
        return sorted((t for t in records if org_id is None or t.org_id == org_id), key=lambda t: t.created_at)
