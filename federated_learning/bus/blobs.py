"""Content-addressed blob store: bytes under their SHA-256, with a size limit."""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis as redis_sync
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode as SyncClusterNode
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from federated_learning.protocol.keys import Keys
from federated_learning.protocol.storage import BlobStoreDescriptor
from federated_learning.protocol.tensors import InvalidTensor, digest_of, header_bytes_needed
from federated_learning.types import BlobDigest

T = TypeVar("T")

BULK_READ_BYTES = 1 << 20
"""Socket read size of the connections that fetch blobs for :meth:`BlobStore.get_each`."""
BULK_RETRIES = 3
"""How often a blob GET is retried on a lost connection before the error surfaces."""
BULK_SOCKET_TIMEOUT_S = 30.0
"""Seconds one read of a blob fetch may wait for bytes (when the client sets no timeout of its
own): a worker thread must not hang on a server that stopped answering."""
_SYNC_CONNECTIONS = {"Connection": redis_sync.Connection, "SSLConnection": redis_sync.SSLConnection,
                     "UnixDomainSocketConnection": redis_sync.UnixDomainSocketConnection}
_SYNC_SETTINGS = frozenset({"host", "port", "path", "db", "username", "password", "client_name",
                            "socket_timeout", "socket_connect_timeout", "socket_keepalive",
                            "socket_keepalive_options"})


def blocking_client_like(client: aioredis.Redis) -> redis_sync.Redis:
    """A blocking (thread-safe) client of the same server, user and TLS files as ``client``.

    Worker threads fetch blobs on it: a blocking read releases the GIL and copies the reply
    once, where the event loop's reader costs about twice the CPU per byte and runs on one
    thread only.
    """
    if isinstance(client, AsyncRedisCluster):
        return _blocking_cluster_like(client)
    pool = client.connection_pool
    connection_class = _SYNC_CONNECTIONS.get(pool.connection_class.__name__)
    if connection_class is None:
        raise TypeError(f"no blocking counterpart of {pool.connection_class.__name__}")
    settings = _blocking_settings(pool.connection_kwargs, _SYNC_SETTINGS)
    return redis_sync.Redis(connection_pool=redis_sync.ConnectionPool(
        connection_class=connection_class, socket_read_size=BULK_READ_BYTES,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), BULK_RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError], **settings))


def _blocking_settings(given: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """The connection settings of ``given`` a blocking client takes (``names`` and TLS files),
    with a socket timeout of :data:`BULK_SOCKET_TIMEOUT_S` unless ``given`` set one."""
    settings = {name: value for name, value in given.items() if name in names or name.startswith("ssl_")}
    if settings.get("socket_timeout") is None:
        settings["socket_timeout"] = BULK_SOCKET_TIMEOUT_S
    return settings


def _blocking_cluster_like(client: AsyncRedisCluster) -> redis_sync.Redis:
    """The blocking counterpart of a cluster client: seeded with the nodes it knows, the same
    user, password and TLS files."""
    given = client.nodes_manager.connection_kwargs
    settings = _blocking_settings(given, _SYNC_SETTINGS - {"host", "port", "path", "db"})
    if given.get("connection_class") is not None and "SSL" in given["connection_class"].__name__:
        settings["ssl"] = True
    nodes = [SyncClusterNode(node.host, node.port) for node in client.get_nodes()]  # type: ignore[no-untyped-call]
    # Typed as the plain client, like the asyncio cluster client (``bus/connection.py``).
    return cast(redis_sync.Redis, SyncRedisCluster(
        startup_nodes=nodes, socket_read_size=BULK_READ_BYTES,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), BULK_RETRIES * 2), **settings))


OFF_LOOP_HASH_BYTES = 1 << 20
"""Blobs from this size are hashed on a worker thread (hashlib lets go of the GIL): SHA-256 runs at
about 1.8 GB/s, so a 256 MB model would hold the event loop, and every heartbeat on it, 140 ms."""


async def _digest(data: bytes) -> BlobDigest:
    """The blob's SHA-256; a large one hashed on a worker thread (:data:`OFF_LOOP_HASH_BYTES`)."""
    return digest_of(data) if len(data) < OFF_LOOP_HASH_BYTES else await asyncio.to_thread(digest_of, data)


_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_OWNER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


def is_digest(name: str) -> bool:
    """Whether ``name`` is a blob's name in a store: a SHA-256 in lowercase hex."""
    return _DIGEST.match(name) is not None


def is_owner(name: str) -> bool:
    """Whether ``name`` may own blobs in a store: a plain name, nothing that leaves a folder or prefix."""
    return _OWNER.match(name) is not None and ".." not in name


def checked_digest(digest: BlobDigest) -> str:
    if not is_digest(digest):
        raise ValueError(f"'{digest}' is not a SHA-256 digest")
    return digest


def checked_owner(owner: str) -> str:
    if not is_owner(owner):
        raise ValueError(f"'{owner}' cannot own blobs")
    return owner


class BlobMissing(LookupError):
    """No blob is stored under this digest (never uploaded, or expired)."""


class BlobStoreError(RuntimeError):
    """The store itself failed: a blob folder that cannot be read or written (permissions, a full
    or read-only disk). Not the bus: an agent reports it and skips the task."""


SMALL_BLOB_BYTES = 256 * 1024
"""Blobs up to this size are fetched together by :meth:`BlobStore.get_each`: for them a round trip
and a thread hand-off each cost more than their bytes (1,000 updates of a 650-parameter model)."""
SMALL_BATCH_BYTES = 16 << 20
"""At most this many bytes of small blobs in one pipeline."""

HEAD_PROBE_BYTES = 16 * 1024
"""Leading bytes read with a blob's size: enough for the safetensors header of a model of a few
hundred layers (a longer header costs a second read)."""


@dataclass(frozen=True)
class BlobHead:
    """A blob's size and first bytes (its whole safetensors header, when it has a valid one)."""

    digest: BlobDigest
    size: int
    head: bytes


class BlobStore(ABC):
    """Content-addressed blobs: models and optimiser state (the services', no owner) and agents'
    uploads (``owner``: the uploading agent, or an organisation's uploaded models); written once,
    verified against their SHA-256 on every read.

    Kept in Redis (:class:`RedisBlobStore`, the default) or as files in a folder the services and
    their agents share (``bus/blob_files.py``); ``bus/blob_stores.py`` opens the deployment's.
    """

    in_redis: bool
    """Whether the blobs live in the deployment's Redis (a transaction may then unlink one)."""

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def close(self) -> None:
        """Let go of what the store opened itself."""

    @abstractmethod
    def describe(self) -> BlobStoreDescriptor:
        """What agents are told of this store (``bus/blob_stores.py``)."""

    @abstractmethod
    async def put(self, data: bytes, *, ttl_s: int | None = None, owner: str | None = None) -> BlobDigest:
        """Store ``data`` (idempotent: a stored blob keeps its expiry) and return its digest;
        ``ttl_s``: it expires then unless kept (:meth:`keep`)."""

    @abstractmethod
    async def get(self, digest: BlobDigest, *, owner: str | None = None) -> bytes:
        """The blob's bytes; raises :class:`BlobMissing`, or ``InvalidTensor('hash_mismatch')``."""

    @abstractmethod
    async def get_each(self, blobs: Sequence[tuple[BlobDigest, str | None]], then: Callable[[int, bytes], T], *,
                       executor: Executor) -> list[T | BlobMissing | InvalidTensor]:
        """Fetch blobs (digest, owner) and hand each to ``then(index, data)`` on a thread of
        ``executor``; one result per blob, in order. A blob's :class:`BlobMissing` or
        :class:`InvalidTensor` (``too_large``, ``hash_mismatch``, or raised by ``then``) is its
        result; any other exception propagates."""

    @abstractmethod
    async def head(self, digest: BlobDigest, *, owner: str | None = None) -> BlobHead:
        """A blob's size and its first bytes, enough for its safetensors header (the blob is not
        read, nor its hash checked); raises :class:`BlobMissing`."""

    @abstractmethod
    async def heads(self, blobs: Sequence[tuple[BlobDigest, str]]) -> dict[tuple[BlobDigest, str], BlobHead]:
        """:meth:`head` of each (digest, owner) at once; a missing blob has no entry."""

    @abstractmethod
    async def exists(self, digest: BlobDigest, *, owner: str | None = None) -> bool: ...

    @abstractmethod
    async def keep(self, blobs: Sequence[tuple[BlobDigest, str | None]]) -> None:
        """Take away the expiry of these blobs (accepted uploads, until their round commits);
        a missing one is skipped."""

    @abstractmethod
    async def discard(self, blobs: Sequence[tuple[BlobDigest, str | None]]) -> None:
        """Delete blobs (digest, owner) that are no longer needed; a missing one is skipped."""

    async def sweep_expired(self) -> int:
        """Delete the blobs whose expiry passed; the number deleted (Redis expires keys itself)."""
        return 0

    async def check_writable(self, owner: str) -> None:
        """Raise :class:`BlobStoreError` unless ``owner`` can store uploads here (an agent asks
        when it joins; on Redis its ACL user decides, which it learns at its first upload)."""

    def _checked(self, index: int, digest: BlobDigest, data: bytes | None,
                 then: Callable[[int, bytes], T]) -> T | BlobMissing | InvalidTensor:
        """A fetched blob (None: missing) checked, through ``then``."""
        try:
            if data is None:
                raise BlobMissing(f"no blob {digest}")
            if len(data) > self.max_bytes:
                raise self._too_large(digest, len(data))
            if digest_of(data) != digest:
                raise InvalidTensor("hash_mismatch", f"blob stored under {digest} has another hash")
            return then(index, data)
        except (BlobMissing, InvalidTensor) as exc:
            return exc

    def _too_large(self, digest: BlobDigest, size: int) -> InvalidTensor:
        return InvalidTensor("too_large", f"blob {digest} of {size} bytes exceeds the limit {self.max_bytes}")


class RedisBlobStore(BlobStore):
    """Blobs in Redis under ``<prefix>:blob:<sha256>`` (the services'), or an agent's uploads
    under ``<prefix>:upload:<agent>:<sha256>`` (``owner``)."""

    in_redis = True

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, max_bytes: int) -> None:
        super().__init__(max_bytes=max_bytes)
        self._redis = redis
        self._keys = keys
        self._blocking: redis_sync.Redis | None = None

    def describe(self) -> BlobStoreDescriptor:
        return BlobStoreDescriptor(kind="redis")

    def close(self) -> None:
        """Close the blocking connections :meth:`get_each` opened (the asyncio client is the caller's)."""
        if self._blocking is not None:
            self._blocking.close()
            if not isinstance(self._blocking, SyncRedisCluster):  # a cluster client closes its nodes' pools
                self._blocking.connection_pool.disconnect()
            self._blocking = None

    async def put(self, data: bytes, *, ttl_s: int | None = None, owner: str | None = None) -> BlobDigest:
        if len(data) > self.max_bytes:
            raise InvalidTensor("too_large", f"blob of {len(data)} bytes exceeds the limit {self.max_bytes}")
        digest = await _digest(data)
        await self._redis.set(self._keys.blob(digest, owner), data, nx=True, ex=ttl_s)
        return digest

    async def get(self, digest: BlobDigest, *, owner: str | None = None) -> bytes:
        key = self._keys.blob(digest, owner)
        size = await self._redis.strlen(key)
        if size == 0:
            raise BlobMissing(f"no blob {digest}")
        if size > self.max_bytes:
            raise InvalidTensor("too_large", f"blob {digest} of {size} bytes exceeds the limit {self.max_bytes}")
        data = cast("bytes | None", await self._redis.get(key))
        if data is None:
            raise BlobMissing(f"no blob {digest}")
        if await _digest(data) != digest:
            raise InvalidTensor("hash_mismatch", f"blob stored under {digest} has another hash")
        return bytes(data)

    async def get_each(self, blobs: Sequence[tuple[BlobDigest, str | None]], then: Callable[[int, bytes], T], *,
                       executor: Executor) -> list[T | BlobMissing | InvalidTensor]:
        """Fetch blobs (digest, owner) and hand each to ``then(index, data)``; one result per blob, in order.

        The sizes come first, in one round trip, so a missing or oversized blob moves no bytes.
        Then each blob is fetched, SHA-256-checked and handed to ``then`` on a thread of
        ``executor`` (on its own connection of a blocking client, see :func:`blocking_client_like`),
        so as many blobs are in flight as the executor has threads, each checked as it arrives.
        Blobs of up to :data:`SMALL_BLOB_BYTES` go together instead: one pipeline per
        :data:`SMALL_BATCH_BYTES`, one batch after the other, each checked in one call on a
        thread. A blob's :class:`BlobMissing` or :class:`InvalidTensor` (``too_large``,
        ``hash_mismatch``, or raised by ``then``) is its result; any other exception propagates.
        """
        keys = [self._keys.blob(digest, owner) for digest, owner in blobs]
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.strlen(key)
            sizes = [int(size) for size in await pipe.execute()]
        loop = asyncio.get_running_loop()
        results: list[T | BlobMissing | InvalidTensor | None] = [None] * len(keys)
        small: list[list[int]] = [[]]
        small_bytes = 0
        large: list[int] = []
        for index, size in enumerate(sizes):
            if size == 0:
                results[index] = BlobMissing(f"no blob {blobs[index][0]}")
            elif size > self.max_bytes:
                results[index] = InvalidTensor("too_large", f"blob {blobs[index][0]} of {size} bytes exceeds "
                                                            f"the limit {self.max_bytes}")
            elif size <= SMALL_BLOB_BYTES:
                if small_bytes + size > SMALL_BATCH_BYTES and small[-1]:
                    small.append([])
                    small_bytes = 0
                small[-1].append(index)
                small_bytes += size
            else:
                large.append(index)
        if large and self._blocking is None:
            self._blocking = blocking_client_like(self._redis)

        async def one(index: int) -> None:
            results[index] = await loop.run_in_executor(executor, self._fetched, keys[index], blobs[index][0],
                                                        index, then)

        async def together(indices: list[int]) -> None:
            async with self._redis.pipeline(transaction=False) as fetch:
                for index in indices:
                    fetch.get(keys[index])
                found = await fetch.execute()
            checked = await loop.run_in_executor(executor, self._checked_each, indices,
                                                 [blobs[index][0] for index in indices], found, then)
            for index, result in zip(indices, checked, strict=True):
                results[index] = result

        async def small_ones() -> None:  # one batch at a time: at most SMALL_BATCH_BYTES read ahead
            for indices in small:
                if indices:
                    await together(indices)

        await asyncio.gather(small_ones(), *(one(index) for index in large))
        return cast("list[T | BlobMissing | InvalidTensor]", results)

    def _checked_each(self, indices: list[int], digests: list[BlobDigest], found: list[bytes | None],
                      then: Callable[[int, bytes], T]) -> list[T | BlobMissing | InvalidTensor]:
        """On a worker thread: each fetched blob checked and through ``then``."""
        return [self._checked(index, digest, data, then) for index, digest, data in zip(indices, digests, found, strict=True)]

    def _fetched(self, key: str, digest: BlobDigest, index: int,
                 then: Callable[[int, bytes], T]) -> T | BlobMissing | InvalidTensor:
        """On a worker thread: the blob under ``key``, checked, through ``then``."""
        assert self._blocking is not None
        return self._checked(index, digest, cast("bytes | None", self._blocking.get(key)), then)

    def _stage_head(self, pipe: Pipeline, digest: BlobDigest, owner: str | None) -> None:
        key = self._keys.blob(digest, owner)
        pipe.strlen(key)
        pipe.getrange(key, 0, HEAD_PROBE_BYTES - 1)

    async def _parse_head(self, digest: BlobDigest, size: int, first: bytes, owner: str | None) -> BlobHead:
        if int(size) == 0:
            raise BlobMissing(f"no blob {digest}")
        needed = min(int(size), header_bytes_needed(first))
        if needed > len(first):
            first += cast("bytes", await self._redis.getrange(self._keys.blob(digest, owner), len(first), needed - 1))
        return BlobHead(digest, int(size), bytes(first))

    async def head(self, digest: BlobDigest, *, owner: str | None = None) -> BlobHead:
        async with self._redis.pipeline(transaction=False) as pipe:
            self._stage_head(pipe, digest, owner)
            size, first = await pipe.execute()
        return await self._parse_head(digest, size, first, owner)

    async def heads(self, blobs: Sequence[tuple[BlobDigest, str]]) -> dict[tuple[BlobDigest, str], BlobHead]:
        if not blobs:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for digest, owner in blobs:
                self._stage_head(pipe, digest, owner)
            replies = await pipe.execute()
        found: dict[tuple[BlobDigest, str], BlobHead] = {}
        for k, (digest, owner) in enumerate(blobs):
            size, first = replies[2 * k: 2 * k + 2]
            if int(size) > 0:
                found[(digest, owner)] = await self._parse_head(digest, size, first, owner)
        return found

    async def exists(self, digest: BlobDigest, *, owner: str | None = None) -> bool:
        return bool(await self._redis.exists(self._keys.blob(digest, owner)))

    async def keep(self, blobs: Sequence[tuple[BlobDigest, str | None]]) -> None:
        if blobs:
            async with self._redis.pipeline(transaction=False) as keeper:
                for digest, owner in blobs:
                    keeper.persist(self._keys.blob(digest, owner))
                await keeper.execute()

    async def discard(self, blobs: Sequence[tuple[BlobDigest, str | None]]) -> None:
        """The server frees them off its main thread (UNLINK), so a round's worth of large uploads
        does not stall the bus."""
        if blobs:
            await self._redis.unlink(*(self._keys.blob(digest, owner) for digest, owner in blobs))

