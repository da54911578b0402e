"""Blobs as files in a folder the services and their agents share (``blob_dir``).

Uploads and models then never pass through Redis: an agent writes its update once, into the
page cache, and the services read it from there. Redis keeps only the messages, so its memory
and its append-only file stay small whatever the model's size (decision 0014).

Layout under ``<blob_dir>/<prefix>/``: ``store.json`` (the folder's id, which the coordinator
publishes, so an agent knows it found the right folder), ``blob/<sha256>`` (the services' models
and state: they never expire) and ``upload/<owner>/<sha256>`` (an agent's uploads, an
organisation's models). An upload's modification time is its expiry, as Redis keeps one per
key (:data:`NEVER` once kept). :meth:`FolderBlobStore.sweep_expired` deletes expired uploads; a
reader treats an expired upload as missing, so a sweep that comes late changes nothing.

A blob is written to a temporary file and hard-linked under its name: a reader sees it whole or
not at all, and a second writer of the same bytes leaves a live copy alone (SET NX). Only
regular files count, never followed through a link: whoever may write the folder can delete a
blob, but cannot make the services read or delete anything outside it, nor hang them on a pipe.
The services' blobs are fsynced (a committed version survives a crash of the machine); uploads
are not (decision 0014 says what that costs).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator, Sequence
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
    BlobStoreError,
)
from federated_learning.protocol.storage import BlobStoreDescriptor
from federated_learning.protocol.tensors import InvalidTensor, digest_of, header_bytes_needed
from federated_learning.types import BlobDigest

T = TypeVar("T")
log = logging.getLogger(__name__)

NEVER = 4_102_444_800
"""The expiry (modification time) of a kept upload: 2100-01-01."""
TEMPORARY_PREFIX = ".partial-"
STALE_TEMPORARY_S = 3600.0
"""A temporary file this old belongs to a writer that died; the sweep deletes it."""
MARKER = "store.json"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_TEMPORARY = re.compile(r"^\.partial-[0-9a-f]{64}-[0-9a-f]{8}$")
_OWNER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    """A failing folder (permissions, a full or read-only disk) as :class:`BlobStoreError`."""
    try:
        yield
    except (BlobMissing, InvalidTensor, BlobStoreError):
        raise
    except OSError as exc:
        raise BlobStoreError(f"{what}: {exc}") from exc


class FolderBlobStore(BlobStore):
    """Blobs under ``root`` (the deployment's folder, ``<blob_dir>/<prefix>``)."""

    in_redis = False

    def __init__(self, root: Path, *, max_bytes: int, store_id: str | None = None) -> None:
        super().__init__(max_bytes=max_bytes)
        if not root.is_absolute():
            raise ValueError(f"the blob folder must be an absolute path, not '{root}'")
        self.root = root
        self.store_id = store_id
        """The id in the folder's ``store.json`` (:meth:`create`, :meth:`read_id`)."""

    @classmethod
    def create(cls, root: Path, *, max_bytes: int) -> FolderBlobStore:
        """The services' store: the folder and its id made when missing (the first service to
        start writes the id; the others read it)."""
        with _store_errors(f"blob folder {root}"):
            for folder in (root / "blob", root / "upload"):
                folder.mkdir(parents=True, exist_ok=True)
            marker = root / MARKER
            if not marker.exists():
                partial = root / f"{TEMPORARY_PREFIX}{MARKER}-{secrets.token_hex(4)}"
                partial.write_text(json.dumps({"store_id": secrets.token_hex(16)}))
                with open(partial, "rb") as file:
                    os.fsync(file.fileno())
                _link_or_move(partial, marker)
                partial.unlink(missing_ok=True)
                _fsync_folder(root)
        store = cls(root, max_bytes=max_bytes)
        store.store_id = store.read_id()
        if store.store_id is None:
            raise BlobStoreError(f"{marker} holds no store id")
        return store

    def read_id(self) -> str | None:
        """The id in ``store.json``; None when the folder has none (not a deployment's folder)."""
        try:
            with open(self.root / MARKER, "rb") as file:
                value = json.loads(file.read(4096)).get("store_id")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32}", value) else None

    def describe(self) -> BlobStoreDescriptor:
        return BlobStoreDescriptor(kind="folder", path=str(self.root), store_id=self.store_id)

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
            await asyncio.to_thread(self._write, digest, owner, data, expires_at, durable=ttl_s is None)
            return digest
        return await asyncio.to_thread(self._hash_and_write, data, owner, expires_at, durable=ttl_s is None)

    def _hash_and_write(self, data: bytes, owner: str | None, expires_at: float, *, durable: bool) -> BlobDigest:
        """On a worker thread, in one hand-off: a large blob hashed and written."""
        digest = digest_of(data)
        self._write(digest, owner, data, expires_at, durable=durable)
        return digest

    def _write(self, digest: BlobDigest, owner: str | None, data: bytes, expires_at: float, *,
               durable: bool) -> None:
        """Write ``data`` under its name unless a live copy is there (as SET NX: an expired upload,
        or anything but a regular file, is replaced). Its bytes are whole before its name appears."""
        path = self.path(digest, owner)
        with _store_errors(f"cannot store blob {digest}"):
            try:
                found = os.lstat(path)
                live = stat.S_ISREG(found.st_mode) and (owner is None or found.st_mtime > time.time())
                replace = not live
            except FileNotFoundError:
                live, replace = False, False
            if live:
                return
            self._folder_of(path, create=True)
            partial = path.parent / f"{TEMPORARY_PREFIX}{path.name}-{secrets.token_hex(4)}"
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                with os.fdopen(descriptor, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.utime(file.fileno(), (expires_at, expires_at))
                    if durable:
                        os.fsync(file.fileno())
                if replace:
                    os.replace(partial, path)  # the same bytes, alive again
                else:
                    _link_or_move(partial, path)
            finally:
                partial.unlink(missing_ok=True)
            if durable:
                _fsync_folder(path.parent)

    def _folder_of(self, path: Path, *, create: bool = False) -> None:
        """Refuse a blob's folder that is a link (it would lead out of the store)."""
        folder = path.parent
        if folder.is_symlink() or (folder.parent != self.root and folder.parent.is_symlink()):
            raise BlobStoreError(f"{folder} is a link, not a folder of the blob store")
        if create:
            folder.mkdir(parents=True, exist_ok=True)

    def _read(self, digest: BlobDigest, owner: str | None, limit: int | None = None) -> tuple[int, bytes]:
        """The blob's size and its bytes (the first ``limit`` of them). BlobMissing when absent,
        expired (an upload) or not a regular file; InvalidTensor when over the size limit."""
        with _store_errors(f"cannot read blob {digest}"):
            try:
                descriptor = os.open(self.path(digest, owner), _READ_FLAGS)
            except FileNotFoundError:
                raise BlobMissing(f"no blob {digest}") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise BlobMissing(f"blob {digest} is a link, not a file") from None
                raise
            with os.fdopen(descriptor, "rb") as file:
                status = os.fstat(file.fileno())
                if not stat.S_ISREG(status.st_mode):
                    raise BlobMissing(f"blob {digest} is not a regular file")
                if owner is not None and status.st_mtime <= time.time():
                    raise BlobMissing(f"blob {digest} expired")
                if status.st_size > self.max_bytes:
                    raise self._too_large(digest, status.st_size)
                wanted = status.st_size if limit is None else min(limit, status.st_size)
                return status.st_size, file.read(wanted)

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
        """Each blob's size, for grouping (0 for one that is not a regular file: read, and missed,
        alone)."""
        sizes = []
        for digest, owner in blobs:
            try:
                status = os.lstat(self.path(digest, owner))
                sizes.append(status.st_size if stat.S_ISREG(status.st_mode) else 0)
            except OSError:
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
                if owner is None:
                    continue  # the services' blobs never expire
                with _store_errors(f"cannot keep blob {digest}"):
                    try:
                        os.utime(self.path(digest, owner), (NEVER, NEVER), follow_symlinks=False)
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

    async def check_writable(self, owner: str) -> None:
        def probe() -> None:
            folder = self.path("0" * 64, owner).parent
            with _store_errors(f"cannot store uploads in {folder}"):
                self._folder_of(folder / "probe", create=True)
                probe = folder / f"{TEMPORARY_PREFIX}{'0' * 64}-{secrets.token_hex(4)}"
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
                probe.unlink()
        await asyncio.to_thread(probe)

    async def sweep_expired(self) -> int:
        return await asyncio.to_thread(self.sweep_expired_now, time.time())

    def sweep_expired_now(self, now: float) -> int:
        """Delete expired uploads and temporary files of writers that died; the count. Only names
        the store writes, in its own folders, never through a link; a folder or file that cannot
        be read is skipped with a warning."""
        swept = 0
        for folder, uploads in self._sweep_folders():
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                log.warning("blob sweep: cannot list %s: %s", folder, exc)
                continue
            for entry in entries:
                temporary = _TEMPORARY.match(entry.name) is not None
                if not temporary and not (uploads and _DIGEST.match(entry.name)):
                    continue  # not a name the store writes, or a services' blob (those never expire)
                try:
                    status = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                # A temporary file's modification time is set before it is linked: its age is its ctime.
                gone = status.st_ctime < now - STALE_TEMPORARY_S if temporary else status.st_mtime <= now
                if gone and _unlink(Path(entry.path)):
                    swept += 1
        return swept

    def _sweep_folders(self) -> list[tuple[Path, bool]]:
        """(folder, holds uploads) of every folder the sweep looks in: real folders only."""
        folders: list[tuple[Path, bool]] = []
        blob, upload = self.root / "blob", self.root / "upload"
        if blob.is_dir() and not blob.is_symlink():
            folders.append((blob, False))
        if upload.is_dir() and not upload.is_symlink():
            try:
                folders += [(Path(entry.path), True) for entry in os.scandir(upload)
                            if entry.is_dir(follow_symlinks=False)]
            except OSError as exc:
                log.warning("blob sweep: cannot list %s: %s", upload, exc)
        return folders


def _link_or_move(partial: Path, path: Path) -> None:
    """Give ``partial`` the name ``path`` unless another writer did first (a hard link fails
    then); on a filesystem without hard links, a rename (the same bytes, so either copy does)."""
    try:
        os.link(partial, path)
    except FileExistsError:
        return
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if not os.path.lexists(path):  # a kept copy that appeared meanwhile keeps its expiry
            os.replace(partial, path)


def _unlink(path: Path) -> bool:
    """Delete ``path`` if it is there; a file this process may not delete (another user's folder)
    is left, with a warning, rather than failing the commit or sweep that wanted it gone."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
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
