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

NEVER = 4_102_444_800
"""The expiry (modification time) of a kept upload: 2100-01-01."""
TEMPORARY_PREFIX = ".partial-"
STALE_TEMPORARY_S = 3600.0
"""A temporary file this old belongs to a writer that died; the sweep deletes it."""
MARKER = "store.json"
_TEMPORARY = re.compile(r"^\.partial-[0-9a-f]{64}-[0-9a-f]{8}$")
_MARKER_TEMPORARY = re.compile(r"^\.partial-store\.json-[0-9a-f]{8}$")
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)
_UNUSABLE_UPLOAD = frozenset({errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENXIO, errno.EISDIR})
"""What an agent can do to its own upload folder or file (a link, a file for a folder, no read
permission): that upload is missing. The store's own failures (a full, read-only or failing
disk) are :class:`BlobStoreError`."""


@contextlib.contextmanager
def _store_errors(what: str, *, upload: bool = False) -> Iterator[None]:
    """A failing folder (permissions, a full or read-only disk) as :class:`BlobStoreError`; for
    an upload, what its agent could have caused as :class:`BlobMissing`."""
    try:
        yield
    except (BlobMissing, InvalidTensor, BlobStoreError):
        raise
    except FileNotFoundError:
        raise BlobMissing(f"{what}: not found") from None
    except OSError as exc:
        if upload and exc.errno in _UNUSABLE_UPLOAD:
            raise BlobMissing(f"{what}: {exc.strerror}") from None
        raise BlobStoreError(f"{what}: {exc}") from exc


class FolderBlobStore(BlobStore):
    """Blobs under ``root`` (the deployment's folder, ``<blob_dir>/<prefix>``).

    Every file is reached through its folder's descriptor, opened without following links
    (``blob/``, ``upload/``, ``upload/<owner>/``): an agent that turns its upload folder into a
    link only loses its uploads.
    """

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
                _write_marker(root, json.dumps({"store_id": secrets.token_hex(16)}).encode())
        store = cls(root, max_bytes=max_bytes)
        for _ in range(100):  # a service that wrote it without hard links may still be writing
            store.store_id = store.read_id()
            if store.store_id is not None:
                return store
            time.sleep(0.01)
        raise BlobStoreError(f"{marker} holds no store id")

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
        return self.root.joinpath(*self._folder_names(owner), checked_digest(digest))

    @staticmethod
    def _folder_names(owner: str | None) -> tuple[str, ...]:
        if owner is None:
            return ("blob",)
        return ("upload", checked_owner(owner))

    def _folder(self, owner: str | None, *, create: bool = False) -> contextlib.AbstractContextManager[int]:
        """The descriptor of the blob's folder, each level opened without following a link."""
        return self._open_folder(self._folder_names(owner), create=create)

    @contextlib.contextmanager
    def _open_folder(self, names: tuple[str, ...], *, create: bool = False) -> Iterator[int]:
        descriptor = os.open(self.root, _FOLDER_FLAGS)
        try:
            for name in names:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, dir_fd=descriptor)
                        os.fsync(descriptor)  # the new folder's entry, as durable as what goes in it
                inner = os.open(name, _FOLDER_FLAGS, dir_fd=descriptor)
                os.close(descriptor)
                descriptor = inner
            yield descriptor
        finally:
            os.close(descriptor)

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
        """Write ``data`` under its name unless a live, whole copy is there (as SET NX: an expired
        upload, or anything but a regular file of its size, is replaced). Its bytes are whole
        before its name appears."""
        name = checked_digest(digest)
        with _store_errors(f"cannot store blob {digest}"), self._folder(owner, create=True) as folder:
            try:
                found = os.stat(name, dir_fd=folder, follow_symlinks=False)
                live = (stat.S_ISREG(found.st_mode) and found.st_size == len(data)
                        and (owner is None or found.st_mtime > time.time()))
                replace = not live
            except FileNotFoundError:
                live, replace = False, False
            if live:
                return
            partial = f"{TEMPORARY_PREFIX}{name}-{secrets.token_hex(4)}"
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o644, dir_fd=folder)
            try:
                with os.fdopen(descriptor, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.utime(file.fileno(), (expires_at, expires_at))
                    if durable:
                        os.fsync(file.fileno())
                if replace:
                    os.replace(partial, name, src_dir_fd=folder, dst_dir_fd=folder)  # the same bytes, alive again
                else:
                    _link_or_move(partial, name, folder)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial, dir_fd=folder)
            if durable:
                os.fsync(folder)

    def _read(self, digest: BlobDigest, owner: str | None, limit: int | None = None) -> tuple[int, bytes]:
        """The blob's size and its bytes (the first ``limit`` of them). BlobMissing when absent,
        expired (an upload) or not a regular file; InvalidTensor when over the size limit."""
        name = checked_digest(digest)
        with _store_errors(f"blob {digest}", upload=owner is not None), self._folder(owner) as folder:
            try:
                descriptor = os.open(name, _READ_FLAGS, dir_fd=folder)
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
        small: list[int] | None = None  # the group of small blobs being filled
        group_bytes = 0
        for index, size in enumerate(sizes):
            if size > SMALL_BLOB_BYTES:
                groups.append([index])
                continue
            if small is None or group_bytes + size > SMALL_BATCH_BYTES:
                small = []
                groups.append(small)
                group_bytes = 0
            small.append(index)
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
        """Each blob's size, for grouping (0 for one that is not a regular file here: read, and
        missed, alone)."""
        sizes = []
        for digest, owner in blobs:
            try:
                with self._folder(owner) as folder:
                    status = os.stat(checked_digest(digest), dir_fd=folder, follow_symlinks=False)
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
                try:
                    with _store_errors(f"cannot keep blob {digest}", upload=True), self._folder(owner) as folder:
                        os.utime(checked_digest(digest), (NEVER, NEVER), dir_fd=folder, follow_symlinks=False)
                except BlobMissing:
                    continue  # gone, or made unusable by its agent: the aggregator refuses it
        if blobs:
            await asyncio.to_thread(keep_all)

    async def discard(self, blobs: Sequence[tuple[BlobDigest, str | None]]) -> None:
        def discard_all() -> None:
            for digest, owner in blobs:
                try:
                    with self._folder(owner) as folder:
                        _unlink(checked_digest(digest), folder, self.path(digest, owner))
                except OSError:
                    continue  # no such folder (nothing to delete), or a link: not the store's to delete
        if blobs:
            await asyncio.to_thread(discard_all)

    async def check_writable(self, owner: str) -> None:
        def probe() -> None:
            with _store_errors(f"cannot store uploads in {self.root / 'upload' / owner}"), \
                    self._folder(owner, create=True) as folder:
                name = f"{TEMPORARY_PREFIX}{'0' * 64}-{secrets.token_hex(4)}"
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder))
                os.unlink(name, dir_fd=folder)
        await asyncio.to_thread(probe)

    async def sweep_expired(self) -> int:
        return await asyncio.to_thread(self.sweep_expired_now, time.time())

    def sweep_expired_now(self, now: float) -> int:
        """Delete expired uploads and temporary files of writers that died; the count. Only names
        the store writes, in its own folders, never through a link; a folder or file that cannot
        be read is skipped with a warning."""
        swept = 0
        for owner in [None, *self._owners()]:
            try:
                with self._folder(owner) as folder:
                    for entry in os.scandir(folder):
                        swept += self._sweep_one(entry, folder, owner, now)
            except OSError as exc:
                log.warning("blob sweep: cannot list the folder of %s: %s", owner or "the services' blobs", exc)
        return swept + self._sweep_marker_temporaries(now)

    def _sweep_marker_temporaries(self, now: float) -> int:
        """Temporary copies of ``store.json`` that a service died writing, once stale."""
        swept = 0
        try:
            with self._open_folder(()) as folder:
                for entry in os.scandir(folder):
                    if _MARKER_TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False) \
                            and entry.stat(follow_symlinks=False).st_ctime < now - STALE_TEMPORARY_S:
                        swept += _unlink(entry.name, folder, self.root / entry.name)
        except OSError as exc:
            log.warning("blob sweep: cannot list %s: %s", self.root, exc)
        return swept

    def _owners(self) -> list[str]:
        """The owners with a real folder under ``upload/``."""
        try:
            with self._open_folder(("upload",)) as uploads:
                return [entry.name for entry in os.scandir(uploads)
                        if entry.is_dir(follow_symlinks=False) and is_owner(entry.name)]
        except OSError as exc:
            log.warning("blob sweep: cannot list %s: %s", self.root / "upload", exc)
            return []

    def _sweep_one(self, entry: os.DirEntry[str], folder: int, owner: str | None, now: float) -> int:
        temporary = _TEMPORARY.match(entry.name) is not None
        if not temporary and not (owner is not None and is_digest(entry.name)):
            return 0  # not a name the store writes, or a services' blob (those never expire)
        try:
            status = entry.stat(follow_symlinks=False)
        except OSError:
            return 0
        # A temporary file's modification time is set before it is linked: its age is its ctime.
        gone = status.st_ctime < now - STALE_TEMPORARY_S if temporary else status.st_mtime <= now
        shown = self.root.joinpath(*self._folder_names(owner), entry.name)
        return 1 if gone and _unlink(entry.name, folder, shown) else 0


def _linked(partial: str, name: str, folder: int) -> bool:
    """Hard-link ``partial`` as ``name`` in ``folder``: True when linked, or when another writer's
    link was there first; False on a filesystem without hard links."""
    try:
        os.link(partial, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
    except FileExistsError:
        return True
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        return False
    return True


def _link_or_move(partial: str, name: str, folder: int) -> None:
    """Give ``partial`` the name ``name`` in ``folder`` unless another writer did first; on a
    filesystem without hard links, a rename (the same bytes either way)."""
    if not _linked(partial, name, folder):
        try:
            os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:  # a kept copy that appeared meanwhile keeps its expiry
            os.replace(partial, name, src_dir_fd=folder, dst_dir_fd=folder)


def _create_durably(name: str, folder: int, content: bytes) -> None:
    """A new file ``name`` in ``folder`` holding ``content``, on disk (FileExistsError if there)."""
    descriptor = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=folder)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())


def _write_marker(root: Path, content: bytes) -> None:
    """``store.json`` written whole, by one writer: linked into place, or (without hard links)
    created exclusively, so that a second service reads the first one's id."""
    with _store_errors(f"cannot write {root / MARKER}"):
        folder = os.open(root, _FOLDER_FLAGS)
        try:
            partial = f"{TEMPORARY_PREFIX}{MARKER}-{secrets.token_hex(4)}"
            _create_durably(partial, folder, content)
            try:
                if not _linked(partial, MARKER, folder):
                    with contextlib.suppress(FileExistsError):
                        _create_durably(MARKER, folder, content)
            finally:
                os.unlink(partial, dir_fd=folder)
            os.fsync(folder)
        finally:
            os.close(folder)


def _unlink(name: str, folder: int, shown: Path) -> bool:
    """Delete ``name`` in ``folder`` if it is there; a file this process may not delete (another
    user's folder) is left, with a warning, rather than failing the commit or sweep that wanted
    it gone."""
    try:
        os.unlink(name, dir_fd=folder)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("cannot delete blob %s: %s (give the services write access to the blob folder)", shown, exc)
        return False
    return True
