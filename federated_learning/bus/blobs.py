"""Content-addressed blob store: bytes under their SHA-256, with a size limit."""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis

from federated_learning.protocol.keys import Keys
from federated_learning.protocol.tensors import InvalidTensor, digest_of
from federated_learning.types import BlobDigest


class BlobMissing(LookupError):
    """No blob is stored under this digest (never uploaded, or expired)."""


class BlobStore:
    """Blobs in Redis under ``<prefix>:blob:<sha256>`` (the services'), or an agent's uploads
    under ``<prefix>:upload:<agent>:<sha256>`` (``owner``); written once, verified on read."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, max_bytes: int) -> None:
        self._redis = redis
        self._keys = keys
        self.max_bytes = max_bytes

    async def put(self, data: bytes, *, ttl_s: int | None = None, owner: str | None = None) -> BlobDigest:
        """Store ``data`` (idempotent) and return its digest; ``owner``: the uploading agent."""
        if len(data) > self.max_bytes:
            raise InvalidTensor("too_large", f"blob of {len(data)} bytes exceeds the limit {self.max_bytes}")
        digest = digest_of(data)
        await self._redis.set(self._keys.blob(digest, owner), data, nx=True, ex=ttl_s)
        return digest

    async def get(self, digest: BlobDigest, *, owner: str | None = None) -> bytes:
        """The blob's bytes; raises :class:`BlobMissing`, or ``InvalidTensor('hash_mismatch')``."""
        key = self._keys.blob(digest, owner)
        size = await self._redis.strlen(key)
        if size == 0:
            raise BlobMissing(f"no blob {digest}")
        if size > self.max_bytes:
            raise InvalidTensor("too_large", f"blob {digest} of {size} bytes exceeds the limit {self.max_bytes}")
        data = cast("bytes | None", await self._redis.get(key))
        if data is None:
            raise BlobMissing(f"no blob {digest}")
        if digest_of(data) != digest:
            raise InvalidTensor("hash_mismatch", f"blob stored under {digest} has another hash")
        return bytes(data)

    async def exists(self, digest: BlobDigest, *, owner: str | None = None) -> bool:
        return bool(await self._redis.exists(self._keys.blob(digest, owner)))

    async def discard(self, blobs: list[tuple[BlobDigest, str | None]]) -> None:
        """Delete blobs (digest, owner) that are no longer needed; the server frees them off its
        main thread (UNLINK), so a round's worth of large uploads does not stall the bus."""
        if blobs:
            await self._redis.unlink(*(self._keys.blob(digest, owner) for digest, owner in blobs))

