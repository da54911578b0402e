"""Which blob store a process uses: the services' from their settings, an agent's from what the
coordinator published (``protocol/storage.py``), so an agent needs no setting of its own."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import redis.asyncio as aioredis

from federated_learning.bus.blob_files import FolderBlobStore
from federated_learning.bus.blobs import BlobStore, RedisBlobStore
from federated_learning.bus.replies import text
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.storage import read_descriptor

log = logging.getLogger(__name__)


class BlobStoreUnreachable(RuntimeError):
    """The deployment keeps its blobs in a folder this process cannot see (or not this folder)."""


def services_blob_store(redis: aioredis.Redis, keys: Keys, *, max_bytes: int, blob_dir: Path | None) -> BlobStore:
    """Blobs in ``<blob_dir>/<prefix>`` when a folder is configured (made, with its id, when
    missing: agents look for it before the first blob is written), else in Redis."""
    if blob_dir is None:
        return RedisBlobStore(redis, keys, max_bytes=max_bytes)
    return FolderBlobStore.create(blob_dir / keys.prefix, max_bytes=max_bytes)


async def publish_blob_store(redis: aioredis.Redis, keys: Keys, store: BlobStore) -> None:
    """Tell agents where the blobs are (the coordinator, when it starts); a change is logged, as
    running agents keep the store they found until they restart."""
    described = store.describe().model_dump_json()
    before = cast("bytes | None", await redis.set(keys.blob_store, described, get=True))
    if before is not None and read_descriptor(before) != store.describe():
        log.warning("the deployment's blob store changes from %s to %s: restart the agents, and stop the "
                    "trainings whose blobs stay behind", text(before), described)


async def agent_blob_store(redis: aioredis.Redis, keys: Keys, *, max_bytes: int,
                           blob_folder: Path | None = None) -> tuple[BlobStore, bool]:
    """The store the deployment published, and whether it published one (Redis until it does).

    ``blob_folder``: the deployment's ``blob_dir`` as mounted where the agent runs, when not at the
    path the services see (the deployment's own folder is ``<blob_folder>/<prefix>``). The folder's
    ``store.json`` must hold the published id, else :class:`BlobStoreUnreachable` says what is wrong.
    """
    descriptor = read_descriptor(await redis.get(keys.blob_store))
    if descriptor is None:
        return RedisBlobStore(redis, keys, max_bytes=max_bytes), False
    if descriptor.kind == "redis":
        return RedisBlobStore(redis, keys, max_bytes=max_bytes), True
    assert descriptor.path is not None
    root = blob_folder / keys.prefix if blob_folder is not None else Path(descriptor.path)
    store = FolderBlobStore(root, max_bytes=max_bytes, store_id=descriptor.store_id)
    found = store.read_id() if root.is_dir() else None
    if found != descriptor.store_id:
        where = "is no folder here" if not root.is_dir() else (
            "has no store.json" if found is None else f"belongs to another deployment (store id {found})")
        raise BlobStoreUnreachable(
            f"this deployment keeps its models and uploads as files in {descriptor.path} on the services' host "
            f"(store id {descriptor.store_id}), and {root} {where}: run the agent where that folder is mounted "
            f"(and pass the mount of blob_dir as blob_folder), or train through the HTTP gateway (/sync_model)")
    return store, True
