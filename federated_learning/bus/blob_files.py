"""Blobs as files in a folder the services and their agents share (``blob_dir``).

Uploads and models then never pass through Redis: an agent writes its update once, into the
page cache, and the services read it from there. Redis keeps only the messages, so its memory
and its append-only file stay small whatever the model's size (decision 0014).

Layout under ``<blob_dir>/<prefix>/``: ``blob/<sha256>`` (the services' models and state) and
``upload/<owner>/<sha256>`` (an agent's uploads, an organisation's models). A file's
modification time is its expiry, as Redis keeps one per key: :data:`NEVER` for a blob without
one. :meth:`FolderBlobStore.sweep_expired` deletes expired uploads; a reader treats an expired
file as missing, so a sweep that comes late changes nothing.

A blob is written to a temporary file and hard-linked under its name: a reader sees it whole or
not at all, and a second writer of the same bytes leaves the first one's expiry alone (SET NX).
The services' blobs are fsynced (a committed version survives a crash of the machine); uploads
are not (an agent whose upload was lost sends it again).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TypeVar, cast

from federated_learning.bus.blobs import (
    HEAD_PROBE_BYTES,
    OFF_LOOP_HASH_BYTES,
    SMALL_BATCH_BYTES,
    SMALL_BLOB_BYTES,
    BlobHead,
    BlobMissing,
    BlobStore,
)
from federated_learning.protocol.storage import BlobStoreDescriptor
from federated_learning.protocol.tensors import InvalidTensor, digest_of, header_bytes_needed
from federated_learning.types import BlobDigest

T = TypeVar("T")
log = logging.getLogger(__name__)

NEVER = 4_102_444_800
"""The expiry (modification time) of a blob that does not expire: 2100-01-01."""
TEMPORARY_PREFIX = ".partial-"
STALE_TEMPORARY_S = 3600.0
"""A temporary file this old belongs to a writer that died; the sweep deletes it."""
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_OWNER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


class FolderBlobStore(BlobStore):
    """Blobs under ``root`` (the deployment's folder, ``<blob_dir>/<prefix>``)."""

    in_redis = False

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        super().__init__(max_bytes=max_bytes)
        if not root.is_absolute():
            raise ValueError(f"the blob folder must be an absolute path, not '{root}'")
        self.root = root

    def describe(self) -> BlobStoreDescriptor:
        return BlobStoreDescriptor(kind="folder", path=str(self.root))

    def path(self, digest: BlobDigest, owner: str | None = None) -> Path:
        """Where the blob lives; the digest and owner are checked, so no name leaves the folder."""
        if not _DIGEST.match(digest):
            raise ValueError(f"'{digest}' is not a SHA-256 digest")
        if owner is None:
            return self.root / "blob" / digest
        if not _OWNER.match(owner) or ".." in owner:
            raise ValueError(f"'{owner}' cannot own blobs")
        return self.root / "upload" / owner / digest

    async def put(self, data: bytes, *, ttl_s: int | None = None, owner: str | None = None) -> BlobDigest:
        if len(data) > self.max_bytes:
            raise InvalidTensor("too_large", f"blob of {len(data)} bytes exceeds the limit {self.max_bytes}")
        expires_at = NEVER if ttl_s is None else time.time() + ttl_s
        if len(data) < OFF_LOOP_HASH_BYTES:
            digest = digest_of(data)
            await asyncio.to_thread(self._write, self.path(digest, owner), data, expires_at, durable=ttl_s is None)
            return digest
        return await asyncio.to_thread(self._hash_and_write, data, owner, expires_at, durable=ttl_s is None)

    def _hash_and_write(self, data: bytes, owner: str | None, expires_at: float, *, durable: bool) -> BlobDigest:
        """On a worker thread, in one hand-off: a large blob hashed and written."""
        digest = digest_of(data)
        self._write(self.path(digest, owner), data, expires_at, durable=durable)
        return digest

    @staticmethod
    def _write(path: Path, data: bytes, expires_at: float, *, durable: bool) -> None:
        """Write ``data`` under ``path`` unless a live copy is there (as SET NX: an expired one is
        replaced). Its bytes are whole before its name appears."""
        try:
            expired = path.stat().st_mtime <= time.time()
        except FileNotFoundError:
            expired = None
        if expired is False:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.parent / f"{TEMPORARY_PREFIX}{path.name}-{secrets.token_hex(4)}"
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
                if durable:
                    file.flush()
                    os.fsync(file.fileno())
            os.utime(partial, (expires_at, expires_at))
            if expired:
                os.replace(partial, path)  # the same bytes, alive again
            else:
                _link_or_move(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        if durable:
            _fsync_folder(path.parent)

    def _read(self, digest: BlobDigest, owner: str | None, limit: int | None = None) -> tuple[int, bytes]:
        """The blob's size and its bytes (the first ``limit`` of them); BlobMissing when absent or
        expired, InvalidTensor when over the size limit."""
        try:
            with open(self.path(digest, owner), "rb") as file:
                status = os.fstat(file.fileno())
                if status.st_mtime <= time.time():
                    raise BlobMissing(f"blob {digest} expired")
                if status.st_size > self.max_bytes:
                    raise self._too_large(digest, status.st_size)
                return status.st_size, file.read(-1 if limit is None else limit)
        except FileNotFoundError:
            raise BlobMissing(f"no blob {digest}") from None

    async def get(self, digest: BlobDigest, *, owner: str | None = None) -> bytes:
        return await asyncio.to_thread(self._read_checked, digest, owner)

    def _read_checked(self, digest: BlobDigest, owner: str | None) -> bytes:
        """On a worker thread, in one hand-off: the blob read and its hash checked."""
        data = self._read(digest, owner)[1]
        if digest_of(data) != digest:
            raise InvalidTensor("hash_mismatch", f"blob stored under {digest} has another hash")
        return data

    async def get_each(self, blobs: Sequence[tuple[BlobDigest, str | None]], then: Callable[[int, bytes], T], *,
                       executor: Executor) -> list[T | BlobMissing | InvalidTensor]:
        """Each blob is read, checked and handed to ``then`` on a thread of ``executor``; blobs of
        up to :data:`SMALL_BLOB_BYTES` go in groups of up to :data:`SMALL_BATCH_BYTES`, one call each."""
        sizes = await asyncio.to_thread(self._sizes, blobs)
        groups: list[list[int]] = []
        group_bytes = SMALL_BATCH_BYTES
        for index, size in enumerate(sizes):
            if size > SMALL_BLOB_BYTES:
                groups.append([index])
                continue
            if group_bytes + size > SMALL_BATCH_BYTES:
                groups.append([])
                group_bytes = 0
            groups[-1].append(index)
            group_bytes += size
        loop = asyncio.get_running_loop()
        done = await asyncio.gather(*(loop.run_in_executor(executor, self._read_each, blobs, group, then)
                                      for group in groups))
        results: list[T | BlobMissing | InvalidTensor | None] = [None] * len(blobs)
        for group, group_results in zip(groups, done, strict=True):
            for index, result in zip(group, group_results, strict=True):
                results[index] = result
        return cast("list[T | BlobMissing | InvalidTensor]", results)

    def _sizes(self, blobs: Sequence[tuple[BlobDigest, str | None]]) -> list[int]:
        sizes = []
        for digest, owner in blobs:
            try:
                sizes.append(self.path(digest, owner).stat().st_size)
            except FileNotFoundError:
                sizes.append(0)
        return sizes

    def _read_each(self, blobs: Sequence[tuple[BlobDigest, str | None]], indices: list[int],
                   then: Callable[[int, bytes], T]) -> list[T | BlobMissing | InvalidTensor]:
        """On a worker thread: the blobs at ``indices`` read, checked and through ``then``."""
        results: list[T | BlobMissing | InvalidTensor] = []
        for index in indices:
            digest, owner = blobs[index]
            try:
                data: bytes | None = self._read(digest, owner)[1]
            except BlobMissing:
                data = None
            except InvalidTensor as exc:
                results.append(exc)
                continue
            results.append(self._checked(index, digest, data, then))
        return results

    def _head(self, digest: BlobDigest, owner: str | None) -> BlobHead:
        size, first = self._read(digest, owner, HEAD_PROBE_BYTES)
        needed = min(size, header_bytes_needed(first))
        if needed > len(first):
            first = self._read(digest, owner, needed)[1]
        return BlobHead(digest, size, first)

    async def head(self, digest: BlobDigest, *, owner: str | None = None) -> BlobHead:
        return await asyncio.to_thread(self._head, digest, owner)

    async def heads(self, blobs: Sequence[tuple[BlobDigest, str]]) -> dict[tuple[BlobDigest, str], BlobHead]:
        def read_all() -> dict[tuple[BlobDigest, str], BlobHead]:
            found = {}
            for digest, owner in blobs:
                try:
                    found[(digest, owner)] = self._head(digest, owner)
                except (BlobMissing, InvalidTensor):
                    continue  # read (and refused) again when its notice's turn comes
            return found
        return await asyncio.to_thread(read_all) if blobs else {}

    async def exists(self, digest: BlobDigest, *, owner: str | None = None) -> bool:
        try:
            await asyncio.to_thread(self._read, digest, owner, 0)
        except (BlobMissing, InvalidTensor):
            return False
        return True

    async def keep(self, blobs: Sequence[tuple[BlobDigest, str | None]]) -> None:
        def keep_all() -> None:
            for digest, owner in blobs:
                try:
                    os.utime(self.path(digest, owner), (NEVER, NEVER))
                except FileNotFoundError:
                    continue
        if blobs:
            await asyncio.to_thread(keep_all)

    async def discard(self, blobs: Sequence[tuple[BlobDigest, str | None]]) -> None:
        def discard_all() -> None:
            for digest, owner in blobs:
                _unlink(self.path(digest, owner))
        if blobs:
            await asyncio.to_thread(discard_all)

    async def sweep_expired(self) -> int:
        return await asyncio.to_thread(self.sweep_expired_now, time.time())

    def sweep_expired_now(self, now: float) -> int:
        """Delete what expired by ``now`` and temporary files of writers that died; the count."""
        swept = 0
        folders = [self.root / "blob"]
        try:
            folders += [Path(entry.path) for entry in os.scandir(self.root / "upload") if entry.is_dir()]
        except FileNotFoundError:
            pass
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    status = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.startswith(TEMPORARY_PREFIX):  # its expiry is set before it is linked
                    gone = status.st_ctime < now - STALE_TEMPORARY_S
                else:
                    gone = status.st_mtime <= now
                if gone and _unlink(Path(entry.path)):
                    swept += 1
        return swept


def _link_or_move(partial: Path, path: Path) -> None:
    """Give ``partial`` the name ``path`` unless another writer did first (a hard link fails
    then); on a filesystem without hard links, a rename (the same bytes, so either copy does)."""
    try:
        os.link(partial, path)
    except FileExistsError:
        return
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        os.replace(partial, path)


def _unlink(path: Path) -> bool:
    """Delete ``path`` if it is there; a file this process may not delete (another user's folder)
    is left, with a warning, rather than failing the commit or sweep that wanted it gone."""
    try:
        path.unlink(missing_ok=True)
    except PermissionError as exc:
        log.warning("cannot delete blob %s: %s (give the services write access to the blob folder)", path, exc)
        return False
    return True


def _fsync_folder(folder: Path) -> None:
    """Make a new name in ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
