"""The folder blob store (``bus/blob_files.py``): written whole, verified on read, expiring like
Redis keys, and no name that leaves the folder."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from federated_learning.bus.blob_files import NEVER, TEMPORARY_PREFIX, FolderBlobStore
from federated_learning.bus.blobs import (
    HEAD_PROBE_BYTES,
    SMALL_BLOB_BYTES,
    BlobMissing,
    BlobStoreError,
)
from federated_learning.protocol.storage import BlobStoreDescriptor
from federated_learning.protocol.tensors import InvalidTensor, digest_of, encode_layers

AGENT = "agent-001"


def overwrite(path: Path, data: bytes) -> None:
    """Change a stored file's bytes, keeping its expiry (its modification time)."""
    expires_at = os.stat(path).st_mtime if path.exists() else NEVER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (expires_at, expires_at))


@pytest.fixture
def store(tmp_path: Path) -> FolderBlobStore:
    return FolderBlobStore.create(tmp_path / "fl", max_bytes=1 << 22)


async def test_a_blob_reads_back_and_is_described_by_its_folder(store: FolderBlobStore) -> None:
    digest = await store.put(b"model bytes")
    assert digest == digest_of(b"model bytes")
    assert await store.get(digest) == b"model bytes"
    assert await store.exists(digest) and not await store.exists(digest, owner=AGENT)
    assert store.path(digest) == store.root / "blob" / digest
    assert store.describe() == BlobStoreDescriptor(kind="folder", path=str(store.root), store_id=store.store_id)
    assert os.stat(store.path(digest)).st_mtime == NEVER
    assert [p.name for p in store.path(digest).parent.iterdir()] == [digest]  # no temporary file left


async def test_an_upload_expires_unless_kept(store: FolderBlobStore) -> None:
    digest = await store.put(b"an update", ttl_s=60, owner=AGENT)
    expires_at = os.stat(store.path(digest, AGENT)).st_mtime
    assert time.time() + 50 < expires_at <= time.time() + 60
    assert await store.get(digest, owner=AGENT) == b"an update"

    os.utime(store.path(digest, AGENT), (time.time() - 1, time.time() - 1))  # its expiry passed
    with pytest.raises(BlobMissing):
        await store.get(digest, owner=AGENT)
    assert await store.heads([(digest, AGENT)]) == {}

    kept = await store.put(b"kept update", ttl_s=60, owner=AGENT)
    await store.keep([(kept, AGENT), (digest_of(b"never uploaded"), AGENT)])  # a missing one is skipped
    assert os.stat(store.path(kept, AGENT)).st_mtime == NEVER
    assert await store.put(b"kept update", ttl_s=60, owner=AGENT) == kept  # written again: still kept
    assert os.stat(store.path(kept, AGENT)).st_mtime == NEVER


async def test_the_sweep_deletes_what_expired_and_what_dead_writers_left(store: FolderBlobStore) -> None:
    expired = await store.put(b"expired", ttl_s=60, owner=AGENT)
    fresh = await store.put(b"fresh", ttl_s=60, owner=AGENT)
    model = await store.put(b"model")
    os.utime(store.path(expired, AGENT), (time.time() - 1, time.time() - 1))
    dead_writer = store.path(fresh, AGENT).parent / f"{TEMPORARY_PREFIX}{fresh}-00000000"
    live_writer = store.path(fresh, AGENT).parent / f"{TEMPORARY_PREFIX}{fresh}-11111111"
    dead_writer.write_bytes(b"half")
    live_writer.write_bytes(b"half")

    assert store.sweep_expired_now(time.time()) == 1
    assert not store.path(expired, AGENT).exists() and dead_writer.exists() and live_writer.exists()
    marker_writer = store.root / f"{TEMPORARY_PREFIX}store.json-22222222"  # a service died writing store.json
    marker_writer.write_bytes(b"{")
    assert store.sweep_expired_now(time.time()) == 0 and marker_writer.exists()
    assert store.sweep_expired_now(time.time() + 2 * 3600) == 4  # the fresh upload has expired by then too
    assert not dead_writer.exists() and not live_writer.exists() and not marker_writer.exists()
    assert await store.get(model) == b"model"
    assert await store.sweep_expired() == 0


async def test_bad_blobs_are_refused_with_their_reason(store: FolderBlobStore) -> None:
    with pytest.raises(InvalidTensor, match="exceeds the limit"):
        await store.put(b"x" * (store.max_bytes + 1))
    with pytest.raises(BlobMissing):
        await store.get(digest_of(b"never stored"))

    digest = await store.put(b"honest", ttl_s=60, owner=AGENT)
    overwrite(store.path(digest, AGENT), b"tampered")  # the name stays, the bytes change
    with pytest.raises(InvalidTensor) as tampered:
        await store.get(digest, owner=AGENT)
    assert tampered.value.reason == "hash_mismatch"

    oversized = digest_of(b"big")
    overwrite(store.path(oversized, AGENT), b"x" * (store.max_bytes + 1))
    with pytest.raises(InvalidTensor) as too_large:
        await store.head(oversized, owner=AGENT)
    assert too_large.value.reason == "too_large"


@pytest.mark.parametrize(("digest", "owner"), [
    ("../" + "a" * 61, None), ("A" * 64, None), ("a" * 64, "../agent"), ("a" * 64, "a/b"), ("a" * 64, ".hidden"),
    ("a" * 64, "agent..x"),
])
def test_no_name_leaves_the_folder(store: FolderBlobStore, digest: str, owner: str | None) -> None:
    with pytest.raises(ValueError):
        store.path(digest, owner)


def test_the_folder_is_absolute(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        FolderBlobStore(Path("relative"), max_bytes=1024)


async def test_heads_read_a_header_longer_than_the_probe(store: FolderBlobStore) -> None:
    layers = {f"layer_{i:04d}_{'x' * 40}": np.zeros(2, np.float32) for i in range(400)}
    blob = encode_layers(layers)
    assert int.from_bytes(blob[:8], "little") > HEAD_PROBE_BYTES
    digest = await store.put(blob, ttl_s=60, owner=AGENT)
    heads = await store.heads([(digest, AGENT), (digest_of(b"missing"), AGENT)])
    assert list(heads) == [(digest, AGENT)]
    head = heads[(digest, AGENT)]
    assert head.size == len(blob) and blob.startswith(head.head)
    assert len(head.head) == 8 + int.from_bytes(blob[:8], "little")


async def test_get_each_checks_every_blob_and_keeps_their_order(store: FolderBlobStore) -> None:
    small = [await store.put(bytes([k]) * 1000, ttl_s=60, owner=AGENT) for k in range(5)]
    large = await store.put(b"L" * (SMALL_BLOB_BYTES + 1), ttl_s=60, owner=AGENT)
    tampered = await store.put(b"honest", ttl_s=60, owner=AGENT)
    overwrite(store.path(tampered, AGENT), b"tampered")
    wanted = [(small[0], AGENT), (large, AGENT), (digest_of(b"gone"), AGENT), (tampered, AGENT),
              *((d, AGENT) for d in small[1:])]
    with ThreadPoolExecutor(2) as pool:
        results = await store.get_each(wanted, lambda index, data: (index, len(data)), executor=pool)
    assert results[0] == (0, 1000) and results[1] == (1, SMALL_BLOB_BYTES + 1)
    assert isinstance(results[2], BlobMissing)
    assert isinstance(results[3], InvalidTensor) and results[3].reason == "hash_mismatch"
    assert results[4:] == [(k, 1000) for k in range(4, 8)]


async def test_writers_of_the_same_blob_at_once_leave_one_whole_file(store: FolderBlobStore) -> None:
    data = os.urandom(1 << 20)
    digests = await asyncio.gather(*(store.put(data, ttl_s=60, owner=AGENT) for _ in range(8)))
    assert set(digests) == {digest_of(data)}
    assert [p.name for p in store.path(digests[0], AGENT).parent.iterdir()] == [digests[0]]
    assert await store.get(digests[0], owner=AGENT) == data
    await store.discard([(digests[0], AGENT), (digest_of(b"never"), None)])
    assert not await store.exists(digests[0], owner=AGENT)


async def test_an_expired_upload_written_again_is_alive_again(store: FolderBlobStore) -> None:
    """As SET NX on Redis, where an expired key is gone: the agent's second upload counts."""
    digest = await store.put(b"an update", ttl_s=60, owner=AGENT)
    os.utime(store.path(digest, AGENT), (time.time() - 1, time.time() - 1))
    assert not await store.exists(digest, owner=AGENT)
    assert await store.put(b"an update", ttl_s=60, owner=AGENT) == digest
    assert await store.get(digest, owner=AGENT) == b"an update"


async def test_without_hard_links_a_blob_is_renamed_into_place(
        store: FolderBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(_source: object, _target: object, **_options: object) -> None:
        raise OSError(errno.EPERM, "hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    digest = await store.put(b"model bytes")
    assert await store.get(digest) == b"model bytes"
    assert [p.name for p in store.path(digest).parent.iterdir()] == [digest]


async def test_a_blob_the_services_may_not_delete_is_left_with_a_warning(
        store: FolderBlobStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    digest = await store.put(b"an update", ttl_s=60, owner=AGENT)
    original = os.unlink

    def refuse(path: str, *, dir_fd: int | None = None) -> None:
        if path == digest:
            raise PermissionError(13, "Permission denied", path)
        original(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", refuse)
    await store.discard([(digest, AGENT)])
    assert store.sweep_expired_now(time.time() + 61) == 0
    assert store.path(digest, AGENT).exists()
    assert "give the services write access" in caplog.text


async def test_the_services_blobs_never_expire(store: FolderBlobStore) -> None:
    """A copy that reset modification times (``cp -r``) must not lose the models."""
    model = await store.put(b"model")
    os.utime(store.path(model), (1.0, 1.0))
    await store.keep([(model, None)])
    assert store.sweep_expired_now(time.time()) == 0
    assert await store.get(model) == b"model"


async def test_the_sweep_never_follows_a_link_out_of_the_folder(store: FolderBlobStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = [outside / ("a" * 64), outside / "notes.txt"]
    for victim in victims:
        victim.write_bytes(b"not the store's")
        os.utime(victim, (1.0, 1.0))
    await store.put(b"an update", ttl_s=60, owner=AGENT)
    (store.root / "upload" / "intruder").symlink_to(outside, target_is_directory=True)
    (store.path("b" * 64, AGENT)).symlink_to(victims[0])  # a link under a blob's name
    (store.root / "upload" / AGENT / "notes.txt").write_bytes(b"not a blob's name")
    os.utime(store.root / "upload" / AGENT / "notes.txt", (1.0, 1.0))
    with pytest.raises(BlobMissing, match="link"):
        await store.get("b" * 64, owner=AGENT)

    swept = store.sweep_expired_now(time.time() + 120)

    assert all(victim.read_bytes() == b"not the store's" for victim in victims)
    assert swept == 2  # the expired upload, and the link itself (not what it points to)
    assert (store.root / "upload" / AGENT / "notes.txt").exists()


async def test_a_pipe_under_a_blobs_name_is_missing_not_a_hang(store: FolderBlobStore) -> None:
    digest = "c" * 64
    store.path(digest, AGENT).parent.mkdir(parents=True)
    os.mkfifo(store.path(digest, AGENT))
    os.utime(store.path(digest, AGENT), (NEVER, NEVER))
    with pytest.raises(BlobMissing, match="regular"):
        await asyncio.wait_for(store.get(digest, owner=AGENT), 10)
    assert await asyncio.wait_for(store.heads([(digest, AGENT)]), 10) == {}
    assert await store.put(b"x" * 10, ttl_s=60, owner=AGENT) != digest


async def test_a_new_folder_gets_an_id_that_later_services_read(tmp_path: Path) -> None:
    first = FolderBlobStore.create(tmp_path / "fl", max_bytes=1024)
    second = FolderBlobStore.create(tmp_path / "fl", max_bytes=1024)
    assert first.store_id is not None and first.store_id == second.store_id == second.read_id()
    assert first.describe().store_id == first.store_id
    assert FolderBlobStore(tmp_path / "elsewhere", max_bytes=1024).read_id() is None


async def test_an_agent_learns_when_it_may_not_upload(store: FolderBlobStore) -> None:
    await store.check_writable(AGENT)
    (store.root / "upload" / "locked").symlink_to(store.root / "blob", target_is_directory=True)
    with pytest.raises(BlobStoreError, match="upload/locked: .*Not a directory"):
        await store.check_writable("locked")
    with pytest.raises(BlobStoreError, match="Not a directory"):
        await store.put(b"an update", ttl_s=60, owner="locked")
    assert list((store.root / "blob").iterdir()) == []  # nothing written through the link


async def test_a_linked_upload_folder_reaches_nothing_outside(store: FolderBlobStore, tmp_path: Path) -> None:
    """An agent that turns its upload folder into a link (say, into another content store) makes
    the services neither read, keep nor delete what is there: its uploads are just missing."""
    outside = tmp_path / "some-content-store"
    outside.mkdir()
    digest = digest_of(b"someone else's bytes")
    (outside / digest).write_bytes(b"someone else's bytes")
    os.utime(outside / digest, (NEVER, NEVER))
    (store.root / "upload" / "evil").symlink_to(outside, target_is_directory=True)

    assert not await store.exists(digest, owner="evil")
    with pytest.raises(BlobMissing):
        await store.get(digest, owner="evil")
    assert await store.heads([(digest, "evil")]) == {}
    with ThreadPoolExecutor(1) as pool:
        [result] = await store.get_each([(digest, "evil")], lambda _i, data: data, executor=pool)
    assert isinstance(result, BlobMissing)
    os.utime(outside / digest, (1.0, 1.0))
    await store.keep([(digest, "evil")])
    await store.discard([(digest, "evil")])
    assert store.sweep_expired_now(time.time()) == 0
    assert (outside / digest).read_bytes() == b"someone else's bytes" and os.stat(outside / digest).st_mtime == 1.0


async def test_an_upload_its_agent_made_unreadable_is_missing_not_a_failed_batch(store: FolderBlobStore) -> None:
    good = await store.put(b"an honest update", ttl_s=60, owner=AGENT)
    (store.root / "upload" / "broken").write_bytes(b"a file where a folder should be")
    with ThreadPoolExecutor(2) as pool:
        results = await store.get_each([(good, AGENT), ("d" * 64, "broken")], lambda _i, data: data, executor=pool)
    assert results[0] == b"an honest update" and isinstance(results[1], BlobMissing)
    assert list(await store.heads([(good, AGENT), ("d" * 64, "broken")])) == [(good, AGENT)]


async def test_without_hard_links_the_first_service_still_sets_the_folders_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(_source: object, _target: object, **_options: object) -> None:
        raise OSError(errno.EPERM, "hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    first = FolderBlobStore.create(tmp_path / "fl", max_bytes=1024)
    second = FolderBlobStore.create(tmp_path / "fl", max_bytes=1024)
    assert first.store_id is not None and second.store_id == first.store_id
    assert sorted(p.name for p in (tmp_path / "fl").iterdir()) == ["blob", "store.json", "upload"]


@pytest.mark.parametrize("fields", [
    {"kind": "s3", "bucket": "fl-models"},  # no id
    {"kind": "s3", "store_id": "0" * 32},  # no bucket
    {"kind": "s3", "bucket": "fl-models", "store_id": "0" * 32, "path": "/srv"},
    {"kind": "folder", "path": "/srv", "store_id": "0" * 32, "bucket": "fl-models"},
    {"kind": "redis", "endpoint_url": "http://minio:9000"},
    {"kind": "s3", "bucket": "fl-models", "store_id": "0" * 32, "endpoint_url": "file:///etc"},
])
def test_a_descriptor_names_the_fields_of_its_kind_only(fields: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        BlobStoreDescriptor(**fields)  # type: ignore[arg-type]
    assert BlobStoreDescriptor(kind="s3", bucket="fl-models", store_id="0" * 32).endpoint_url is None
