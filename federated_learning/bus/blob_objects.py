"""Blobs as objects of an S3-compatible object store (AWS S3, MinIO, Ceph, R2, ...).

For agents that run on other machines than the services and share no folder with them: uploads
and models then never pass through Redis (it carries the messages only), and each blob crosses
the network once each way, between its writer or reader and the store (decision 0018).

Layout under ``<bucket>/<prefix>/``: ``store.json`` (the store's id, which the coordinator
publishes, so an agent knows it found the right store), ``blob/<sha256>`` (the services' models
and state: they never expire) and ``upload/<owner>/<sha256>`` (an agent's uploads, an
organisation's models). The semantics are those of the other stores:

- **Written once.** A PUT with ``If-None-Match: *``: a second writer of the same bytes leaves a
  live copy alone (SET NX), and replaces one that has expired.
- **Verified on every read**: the size limit before the body is read, then the SHA-256.
- **Expiry, for uploads only.** An upload's metadata ``fl-expires`` holds its expiry (unix
  seconds; at most :data:`MAX_UPLOAD_TTL_S` after it was written, also without a valid one).
  :meth:`ObjectBlobStore.keep` tags it ``fl-kept=1`` (an accepted upload, until its round commits;
  an owned blob the services write without expiry, such as an organisation's model, at once): the PERSIST of the Redis store, without copying the object. A reader treats an
  expired upload that is not kept as missing; the coordinator's sweep deletes it. The tag is read
  only for an upload past its expiry, so a live upload costs one request to read.
- **Durable** once the store acknowledged the PUT.

Credentials come from the standard AWS chain of whoever runs the process (``AWS_ACCESS_KEY_ID``
and ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance or pod role): the services need read,
write, delete, tagging and listing under the prefix; an agent needs only to read ``store.json``,
``blob/`` and its own uploads, and to write ``upload/<its id>/``, never to tag (docs/operations.md
has such a policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from federated_learning.bus.blobs import (
    HEAD_PROBE_BYTES,
    OFF_LOOP_HASH_BYTES,
    BlobHead,
    BlobMissing,
    BlobStore,
    BlobStoreError,
    checked_digest,
    checked_owner,
    is_digest,
    is_owner,
)
from federated_learning.protocol.storage import BlobStoreDescriptor
from federated_learning.protocol.tensors import InvalidTensor, digest_of, header_bytes_needed
from federated_learning.types import BlobDigest

T = TypeVar("T")
log = logging.getLogger(__name__)
logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "Found credentials in ..." per client

MARKER = "store.json"
EXPIRES = "fl-expires"
"""The metadata entry that holds an upload's expiry (unix seconds)."""
KEPT_TAG = {"Key": "fl-kept", "Value": "1"}
MAX_UPLOAD_TTL_S = 24 * 3600
"""The longest an upload lives unless kept, whatever its metadata says (agents and the HTTP
gateway ask for 24 h): an agent writing with its own S3 client keeps an upload only by writing it
again. Also the age at which the sweep deletes a key under ``upload/`` that is no blob's."""
SWEEP_MIN_AGE_S = 600.0
"""The sweep looks at uploads at least this old only: most uploads are deleted when their round
commits, so the sweep reads the expiry of the few left behind, not of every upload."""
DELETE_BATCH = 1000
"""Keys per DeleteObjects request (the API's limit)."""
CONNECTIONS = 64
"""HTTP connections one store keeps to the object store: blobs are fetched in parallel, one per
thread of the executor that checks them."""
_MISSING = frozenset({"NoSuchKey"})
"""Every read is a GET, whose error names its code (a HEAD's is a bare 404, as for a missing
bucket or a wrong endpoint, and some stores ask more of a HEAD than of a GET)."""
_EXPIRY = re.compile(r"^[0-9]{1,12}$")
BODY_READS = 3
"""How often a GET is made again when its body breaks off (a dropped connection, a read timeout)."""
_BODY_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError)
_EXISTS = frozenset({"PreconditionFailed", "412"})
_RACED = frozenset({"ConditionalRequestConflict", "409"})


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    """The object store's failures as :class:`BlobStoreError` (no bucket, no access, the store
    unreachable), a missing object as :class:`BlobMissing`."""
    try:
        yield
    except (BlobMissing, InvalidTensor, BlobStoreError):
        raise
    except ClientError as exc:
        if _code(exc) in _MISSING:
            raise BlobMissing(f"{what}: not found") from None
        raise BlobStoreError(f"{what}: {exc}") from exc
    except BotoCoreError as exc:
        raise BlobStoreError(f"{what}: {exc}") from exc


class _Connection:
    """One S3 client and the threads that run its requests, shared by the stores of a process
    that reach the same store with the same settings (the agents of one process, say): a client
    costs about 13 MB and a third of a second to make (botocore loads the S3 model for each).
    The last store to close it closes it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.requests = ThreadPoolExecutor(CONNECTIONS, thread_name_prefix="object-store")
        self.users = 0


_connections: dict[tuple[str | None, ...], _Connection] = {}
_connections_lock = threading.Lock()


def _connection_key(endpoint_url: str | None, region: str | None) -> tuple[str | None, ...]:
    """What decides a client: the store, and the settings the AWS chain reads from the environment
    (not the credentials it resolves: for a role those are temporary, and resolving them may ask
    STS; the client's session refreshes them itself)."""
    return (endpoint_url, region, *(os.environ.get(name) for name in (
        "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
        "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")))


def _open_connection(endpoint_url: str | None, region: str | None) -> tuple[tuple[str | None, ...], _Connection]:
    """The process's client of the store at ``endpoint_url`` with the AWS chain's settings of now,
    made at first use. Path-style addresses for an endpoint of one's own (MinIO and the like serve
    no bucket subdomains); checksums only where the API requires them, since every read checks
    the blob's SHA-256; thread-safe, with :data:`CONNECTIONS` connections and as many threads."""
    key = _connection_key(endpoint_url, region)
    with _connections_lock:
        connection = _connections.get(key)
        if connection is None:
            config = Config(
                max_pool_connections=CONNECTIONS, connect_timeout=10, read_timeout=30,
                retries={"max_attempts": 4, "mode": "standard"},
                s3={"addressing_style": "path"} if endpoint_url else None,
                request_checksum_calculation="when_required", response_checksum_validation="when_required")
            connection = _Connection(boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config))
            _connections[key] = connection
        connection.users += 1
        return key, connection


def _close_connection(key: tuple[str | None, ...], connection: _Connection) -> None:
    with _connections_lock:
        connection.users -= 1
        if connection.users > 0:
            return
        if _connections.get(key) is connection:
            del _connections[key]
    connection.requests.shutdown(wait=False, cancel_futures=True)
    connection.client.close()


@dataclass(frozen=True)
class _Found:
    """What a GET told about an object before its body is read."""

    size: int
    expired: bool


class ObjectBlobStore(BlobStore):
    """Blobs under ``<prefix>/`` in ``bucket`` of an S3-compatible store."""

    in_redis = False

    def __init__(self, bucket: str, prefix: str, *, max_bytes: int, endpoint_url: str | None = None,
                 region: str | None = None, store_id: str | None = None) -> None:
        super().__init__(max_bytes=max_bytes)
        if not prefix or "/" in prefix:
            raise ValueError(f"'{prefix}' is not a deployment prefix")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.store_id = store_id
        """The id in the store's ``store.json`` (:meth:`create`, :meth:`read_id`)."""
        self._connection_key, self._connection = _open_connection(endpoint_url, region)
        self._client = self._connection.client
        self._requests = self._connection.requests
        self._closed = False
        self._expiry_seen: dict[str, float] = {}
        """The sweep's memory: an old upload's expiry (inf: kept), so it is read once."""

    @classmethod
    def create(cls, bucket: str, prefix: str, *, max_bytes: int, endpoint_url: str | None = None,
               region: str | None = None) -> ObjectBlobStore:
        """The services' store: its ``store.json`` written when missing (the first service to
        start writes the id, with ``If-None-Match``; the others read it)."""
        store = cls(bucket, prefix, max_bytes=max_bytes, endpoint_url=endpoint_url, region=region)
        store.store_id = store.read_id()  # first: a store that ignores If-None-Match keeps its id too
        if store.store_id is not None:
            return store
        marker = json.dumps({"store_id": secrets.token_hex(16)}).encode()
        with _store_errors(f"cannot write s3://{bucket}/{store._key(MARKER)}"):
            try:
                store._client.put_object(Bucket=bucket, Key=store._key(MARKER), Body=marker, IfNoneMatch="*",
                                         ContentType="application/json")
            except ClientError as exc:
                if _code(exc) not in _EXISTS | _RACED:
                    raise
        store.store_id = store.read_id()
        if store.store_id is None:
            raise BlobStoreError(f"s3://{bucket}/{store._key(MARKER)} holds no store id")
        return store

    def read_id(self) -> str | None:
        """The id in ``store.json``; None when there is none (not a deployment's store). Raises
        :class:`BlobStoreError` when the store cannot be asked (no bucket, no access, unreachable)."""
        try:
            with _store_errors(f"cannot read s3://{self.bucket}/{self._key(MARKER)}"):
                reply = self._client.get_object(Bucket=self.bucket, Key=self._key(MARKER))
                with contextlib.closing(reply["Body"]) as body:
                    value = json.loads(body.read(4096)).get("store_id")
        except BlobMissing:
            return None
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32}", value) else None

    def describe(self) -> BlobStoreDescriptor:
        return BlobStoreDescriptor(kind="s3", bucket=self.bucket, endpoint_url=self.endpoint_url,
                                   region=self.region, store_id=self.store_id)

    def close(self) -> None:
        """Let go of the shared client; the last store of it closes it."""
        if not self._closed:
            self._closed = True
            _close_connection(self._connection_key, self._connection)

    async def _off_loop(self, call: Callable[..., T], *args: Any) -> T:
        """Run a blocking request on the connection's own threads, as many as its connections: on
        the loop's default executor (a few threads) a thousand requests would wait in line."""
        return await asyncio.get_running_loop().run_in_executor(self._requests, functools.partial(call, *args))

    def key(self, digest: BlobDigest, owner: str | None = None) -> str:
        """The blob's object key; the digest and owner are checked, so no key leaves the prefix."""
        if owner is None:
            return self._key("blob", checked_digest(digest))
        return self._key("upload", checked_owner(owner), checked_digest(digest))

    def _key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    # -- writing ---------------------------------------------------------------
    async def put(self, data: bytes, *, ttl_s: int | None = None, owner: str | None = None) -> BlobDigest:
        if len(data) > self.max_bytes:
            raise InvalidTensor("too_large", f"blob of {len(data)} bytes exceeds the limit {self.max_bytes}")
        if len(data) < OFF_LOOP_HASH_BYTES:
            digest = digest_of(data)
            await self._off_loop(self._write, digest, owner, data, ttl_s)
            return digest
        return await self._off_loop(self._hash_and_write, data, owner, ttl_s)

    def _hash_and_write(self, data: bytes, owner: str | None, ttl_s: int | None) -> BlobDigest:
        digest = digest_of(data)
        self._write(digest, owner, data, ttl_s)
        return digest

    def _write(self, digest: BlobDigest, owner: str | None, data: bytes, ttl_s: int | None) -> None:
        """PUT unless a live copy is there (SET NX); an expired copy is replaced by the same bytes."""
        key = self.key(digest, owner)
        metadata = {} if ttl_s is None or owner is None else {EXPIRES: str(int(time.time() + ttl_s))}
        extra: dict[str, Any] = {"Metadata": metadata}
        if owner is not None and ttl_s is None:
            extra["Tagging"] = "fl-kept=1"  # an owned blob without expiry (an organisation's model)
        with _store_errors(f"cannot store blob {digest}"):
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*",
                                        ContentType="application/octet-stream", **extra)
                return
            except ClientError as exc:
                if _code(exc) not in _EXISTS | _RACED:
                    raise
            try:  # a GET, not a HEAD: an agent may read its own uploads, and some stores ask more for a HEAD
                reply = self._get(key, "bytes=0-0")
                reply["Body"].close()
                if _total_size(reply) == len(data) and not self._expired(key, owner, reply):
                    return  # a live copy, or a kept one (the writer may read its uploads' tags)
            except ClientError as exc:
                if _code(exc) not in _MISSING:  # deleted meanwhile: written again below
                    raise
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/octet-stream",
                                    **extra)

    async def keep(self, blobs: Sequence[tuple[BlobDigest, str | None]]) -> None:
        uploads = [(digest, owner) for digest, owner in blobs if owner is not None]  # services' blobs never expire
        if uploads:
            await asyncio.gather(*(self._off_loop(self._keep, digest, owner) for digest, owner in uploads))

    def _keep(self, digest: BlobDigest, owner: str) -> None:
        with contextlib.suppress(BlobMissing), _store_errors(f"cannot keep blob {digest}"):
            self._client.put_object_tagging(Bucket=self.bucket, Key=self.key(digest, owner),
                                            Tagging={"TagSet": [KEPT_TAG]})

    async def discard(self, blobs: Sequence[tuple[BlobDigest, str | None]]) -> None:
        """A store that fails to delete is logged, not raised: the commit that wanted the blobs gone
        stands, and the sweep deletes expired uploads later."""
        if blobs:
            try:
                await self._off_loop(self._delete, [self.key(digest, owner) for digest, owner in blobs])
            except BlobStoreError as exc:
                log.warning("cannot delete %d blob(s) in s3://%s: %s", len(blobs), self.bucket, exc)

    def _delete(self, keys: list[str]) -> int:
        """Delete ``keys`` (a missing one counts as deleted); the number the store deleted. A key it
        refused is left, with a warning, rather than failing the commit or sweep that wanted it gone."""
        deleted = 0
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start:start + DELETE_BATCH]
            with _store_errors("cannot delete blobs"):
                reply = self._client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": key} for key in batch], "Quiet": True})
            errors = reply.get("Errors", [])
            for error in errors:
                log.warning("cannot delete blob s3://%s/%s: %s", self.bucket, error.get("Key"), error.get("Message"))
            deleted += len(batch) - len(errors)
        return deleted

    async def check_writable(self, owner: str) -> None:
        """An empty upload, expiring in a minute: it fails as the agent's real uploads would."""
        await self._off_loop(self._write, digest_of(b""), owner, b"", 60)

    # -- reading ---------------------------------------------------------------
    def _expired(self, key: str, owner: str | None, reply: dict[str, Any]) -> bool:
        """Whether an upload is past its expiry and not kept (the tag is read only then)."""
        if owner is None:
            return False
        if _expiry(reply) > time.time():
            return False
        tags = self._client.get_object_tagging(Bucket=self.bucket, Key=key)["TagSet"]
        return KEPT_TAG not in tags

    def _get(self, key: str, byte_range: str | None = None) -> dict[str, Any]:
        """GET an object, or a range of it. No range of an empty object exists: a range from its
        start gets the object whole if, and only if, it is empty."""
        if byte_range is None:
            return cast("dict[str, Any]", self._client.get_object(Bucket=self.bucket, Key=key))
        try:
            return cast("dict[str, Any]", self._client.get_object(Bucket=self.bucket, Key=key, Range=byte_range))
        except ClientError as exc:
            if _code(exc) != "InvalidRange" or not byte_range.startswith("bytes=0-"):
                raise
        whole = cast("dict[str, Any]", self._client.get_object(Bucket=self.bucket, Key=key))
        if int(whole["ContentLength"]) == 0:
            return whole
        whole["Body"].close()  # written meanwhile (its body unread): its range exists now
        return cast("dict[str, Any]", self._client.get_object(Bucket=self.bucket, Key=key, Range=byte_range))

    def _open(self, digest: BlobDigest, owner: str | None, byte_range: str | None = None) -> tuple[_Found, Any]:
        """GET the object (or a range of it): what its headers say, and its unread body."""
        key = self.key(digest, owner)
        reply = self._get(key, byte_range)
        try:
            return _Found(_total_size(reply), self._expired(key, owner, reply)), reply["Body"]
        except BaseException:
            reply["Body"].close()
            raise

    def _read(self, digest: BlobDigest, owner: str | None) -> bytes:
        """The blob's bytes, unchecked: BlobMissing when absent or expired, InvalidTensor when over
        the size limit (its body is then not read). A body that breaks off is read again."""
        with _store_errors(f"blob {digest}"):
            for attempt in range(BODY_READS):
                found, body = self._open(digest, owner)
                with contextlib.closing(body):
                    if found.expired:
                        raise BlobMissing(f"blob {digest} expired")
                    if found.size > self.max_bytes:
                        raise self._too_large(digest, found.size)
                    try:
                        return bytes(body.read())
                    except _BODY_ERRORS:
                        if attempt + 1 == BODY_READS:
                            raise
            raise AssertionError("unreachable")

    async def get(self, digest: BlobDigest, *, owner: str | None = None) -> bytes:
        return await self._off_loop(self._read_checked, digest, owner)

    def _read_checked(self, digest: BlobDigest, owner: str | None) -> bytes:
        data = self._read(digest, owner)
        if digest_of(data) != digest:
            raise InvalidTensor("hash_mismatch", f"blob stored under {digest} has another hash")
        return data

    async def get_each(self, blobs: Sequence[tuple[BlobDigest, str | None]], then: Callable[[int, bytes], T], *,
                       executor: Executor) -> list[T | BlobMissing | InvalidTensor]:
        """Each blob fetched, checked and handed to ``then`` on a thread of ``executor``, as many at
        once as it has threads (an object store has no batched read)."""
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(executor, self._fetched, index, digest, owner, then)
                                           for index, (digest, owner) in enumerate(blobs))))

    def _fetched(self, index: int, digest: BlobDigest, owner: str | None,
                 then: Callable[[int, bytes], T]) -> T | BlobMissing | InvalidTensor:
        try:
            data: bytes | None = self._read(digest, owner)
        except BlobMissing:
            data = None
        except InvalidTensor as exc:
            return exc
        return self._checked(index, digest, data, then)

    def _head(self, digest: BlobDigest, owner: str | None) -> BlobHead:
        with _store_errors(f"blob {digest}"):
            found, body = self._open(digest, owner, f"bytes=0-{HEAD_PROBE_BYTES - 1}")
            with contextlib.closing(body):
                if found.expired:
                    raise BlobMissing(f"blob {digest} expired")
                if found.size > self.max_bytes:
                    raise self._too_large(digest, found.size)
                first = bytes(body.read())
            needed = min(found.size, header_bytes_needed(first))
            if needed > len(first):
                _, body = self._open(digest, owner, f"bytes={len(first)}-{needed - 1}")
                with contextlib.closing(body):  # a blob changed meanwhile is refused by its hash
                    first += bytes(body.read(needed - len(first)))
        return BlobHead(digest, found.size, first)

    async def head(self, digest: BlobDigest, *, owner: str | None = None) -> BlobHead:
        return await self._off_loop(self._head, digest, owner)

    async def heads(self, blobs: Sequence[tuple[BlobDigest, str]]) -> dict[tuple[BlobDigest, str], BlobHead]:
        async def one(digest: BlobDigest, owner: str) -> BlobHead | None:
            try:
                return await self._off_loop(self._head, digest, owner)
            except (BlobMissing, InvalidTensor):
                return None  # read (and refused) again when its notice's turn comes
        found = await asyncio.gather(*(one(digest, owner) for digest, owner in blobs))
        return {blob: head for blob, head in zip(blobs, found, strict=True) if head is not None}

    async def exists(self, digest: BlobDigest, *, owner: str | None = None) -> bool:
        def ask() -> bool:
            try:
                with _store_errors(f"blob {digest}"):
                    found, body = self._open(digest, owner, "bytes=0-0")
                    body.close()
                    return not found.expired
            except BlobMissing:
                return False
        return await self._off_loop(ask)

    # -- expiry ------------------------------------------------------------------
    async def sweep_expired(self) -> int:
        return await asyncio.to_thread(self.sweep_expired_now, time.time())

    def sweep_expired_now(self, now: float) -> int:
        """Delete the uploads past their expiry that are not kept; the count. Only uploads older
        than :data:`SWEEP_MIN_AGE_S` are looked at, each one's expiry read once. A store that
        cannot be listed is skipped with a warning (the next sweep tries again)."""
        expired: list[str] = []
        listed: set[str] = set()
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key("upload", ""))
            for page in pages:
                for entry in page.get("Contents", []):
                    key = entry["Key"]
                    listed.add(key)
                    written = entry["LastModified"].timestamp()
                    if written > now - SWEEP_MIN_AGE_S:
                        continue
                    if not self._upload_key(key):
                        if written <= now - MAX_UPLOAD_TTL_S:
                            expired.append(key)  # no blob's name: nothing reads it
                        continue
                    if self._expiry_seen.get(key, -math.inf) <= now and self._sweepable(key, now):
                        expired.append(key)
            remaining = listed.difference(expired)  # what the next sweep may still see
            self._expiry_seen = {key: at for key, at in self._expiry_seen.items() if key in remaining}
            return self._delete(expired) if expired else 0
        except (ClientError, BotoCoreError, BlobStoreError) as exc:
            log.warning("blob sweep: cannot list or delete the uploads in s3://%s/%s: %s",
                        self.bucket, self._key("upload"), exc)
            return 0

    def _upload_key(self, key: str) -> bool:
        parts = key[len(self.prefix) + 1:].split("/")
        return len(parts) == 3 and is_owner(parts[1]) and is_digest(parts[2])

    def _sweepable(self, key: str, now: float) -> bool:
        """Whether an old upload is expired and not kept; remembers when to look again. One that
        cannot be asked about is left for the next sweep."""
        try:
            reply = self._get(key, "bytes=0-0")
            reply["Body"].close()
            expires = _expiry(reply)
            if expires > now:
                self._expiry_seen[key] = expires
                return False
            if KEPT_TAG in self._client.get_object_tagging(Bucket=self.bucket, Key=key)["TagSet"]:
                self._expiry_seen[key] = math.inf  # kept until its round commits and discards it
                return False
        except (ClientError, BotoCoreError) as exc:
            if not isinstance(exc, ClientError) or _code(exc) not in _MISSING:
                log.warning("blob sweep: cannot read the expiry of s3://%s/%s: %s", self.bucket, key, exc)
            return False
        return True


def _expiry(reply: dict[str, Any]) -> float:
    """An upload's expiry from its metadata, at most :data:`MAX_UPLOAD_TTL_S` after it was written
    (also without valid metadata)."""
    latest = float(reply["LastModified"].timestamp() + MAX_UPLOAD_TTL_S)
    given = str(reply.get("Metadata", {}).get(EXPIRES, ""))
    return min(float(given), latest) if _EXPIRY.match(given) else latest


def _total_size(reply: dict[str, Any]) -> int:
    """The object's whole size, from a ranged GET's ``Content-Range`` (``bytes 0-99/1234``)."""
    content_range = reply.get("ContentRange")
    if content_range:
        return int(str(content_range).rsplit("/", 1)[1])
    return int(reply["ContentLength"])
