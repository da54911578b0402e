"""Which blob store a process uses: the services' from their settings, an agent's from what the
services published (``protocol/storage.py``), so an agent needs no setting of its own."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from federated_learning.bus.blob_files import FolderBlobStore
from federated_learning.bus.blobs import BlobStore, RedisBlobStore
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.storage import BlobStoreDescriptor


class BlobStoreUnreachable(RuntimeError):
    """The deployment keeps its blobs in a folder this process cannot see."""


def services_blob_store(redis: aioredis.Redis, keys: Keys, *, max_bytes: int, blob_dir: Path | None) -> BlobStore:
    """Blobs in ``<blob_dir>/<prefix>`` when a folder is configured, else in Redis."""
    if blob_dir is None:
        return RedisBlobStore(redis, keys, max_bytes=max_bytes)
    root = blob_dir.resolve() / keys.prefix
    root.mkdir(parents=True, exist_ok=True)  # agents look for it before the first blob is written
    return FolderBlobStore(root, max_bytes=max_bytes)


async def publish_blob_store(redis: aioredis.Redis, keys: Keys, store: BlobStore) -> None:
    """Tell agents where the blobs are (every service does at start; the same value each time)."""
    await redis.set(keys.blob_store, store.describe().model_dump_json())


async def agent_blob_store(redis: aioredis.Redis, keys: Keys, *, max_bytes: int,
                           blob_folder: Path | None = None) -> tuple[BlobStore, bool]:
    """The store the deployment published, and whether it published one (Redis until it does);
    ``blob_folder``: the deployment's blob folder as mounted where the agent runs, when not at
    the path the services see."""
    raw = await redis.get(keys.blob_store)
    if raw is None:
        return RedisBlobStore(redis, keys, max_bytes=max_bytes), False
    descriptor = BlobStoreDescriptor.model_validate_json(raw)
    if descriptor.kind == "redis":
        return RedisBlobStore(redis, keys, max_bytes=max_bytes), True
    assert descriptor.path is not None
    root = (blob_folder or Path(descriptor.path)).resolve()
    if not root.is_dir():
        raise BlobStoreUnreachable(
            f"this deployment keeps its models and uploads as files in {descriptor.path} on the services' host, "
            f"and {root} is no folder here: run the agent where that folder is mounted (and pass its path "
            f"here as blob_folder), or train through the HTTP gateway (/sync_model)")
    return FolderBlobStore(root, max_bytes=max_bytes), True
