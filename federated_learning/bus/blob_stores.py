"""Which blob store a process uses: the services' from their settings, an agent's from what the
coordinator published (``protocol/storage.py``), so an agent needs no setting of its own."""

from __future__ import annotations

import asyncio
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import redis.asyncio as aioredis

from federated_learning.bus.blob_files import FolderBlobStore
from federated_learning.bus.blobs import BlobStore, BlobStoreError, RedisBlobStore
from federated_learning.bus.replies import text
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.storage import BlobStoreDescriptor, read_descriptor

if TYPE_CHECKING:
    from federated_learning.bus.blob_objects import ObjectBlobStore
    from federated_learning.config import Settings

log = logging.getLogger(__name__)


class BlobStoreUnreachable(RuntimeError):
    """The deployment keeps its blobs in a folder or bucket this process cannot reach (or not the
    deployment's)."""


@dataclass(frozen=True)
class ObjectStoreSettings:
    """Where the services find the deployment's bucket (``Settings.blob_bucket`` and the rest)."""

    bucket: str
    endpoint_url: str | None = None
    region: str | None = None


def object_store_settings(settings: Settings) -> ObjectStoreSettings | None:
    """The bucket a deployment's settings name, if any."""
    if settings.blob_bucket is None:
        return None
    return ObjectStoreSettings(settings.blob_bucket, endpoint_url=settings.blob_endpoint_url,
                               region=settings.blob_region)


def services_blob_store(redis: aioredis.Redis, keys: Keys, *, max_bytes: int, blob_dir: Path | None,
                        object_store: ObjectStoreSettings | None = None) -> BlobStore:
    """Blobs in ``<blob_dir>/<prefix>`` when a folder is configured, under ``<prefix>/`` in a bucket
    when one is (either made, with its id, when missing: agents look for it before the first blob
    is written), else in Redis."""
    store = _folder_or_bucket(keys.prefix, max_bytes=max_bytes, blob_dir=blob_dir, object_store=object_store)
    return store if store is not None else RedisBlobStore(redis, keys, max_bytes=max_bytes)


def check_services_blob_store(prefix: str, *, max_bytes: int, blob_dir: Path | None,
                              object_store: ObjectStoreSettings | None) -> None:
    """Open the deployment's folder or bucket once, as the services will (its ``store.json``
    made when missing); :class:`BlobStoreUnreachable` with the reason when that fails (no such
    bucket, no access, the store unreachable, a folder that cannot be written). For the launcher,
    before it starts any service."""
    try:
        store = _folder_or_bucket(prefix, max_bytes=max_bytes, blob_dir=blob_dir, object_store=object_store)
    except BlobStoreError as exc:
        where = (f"s3://{object_store.bucket}/{prefix}/ at {object_store.endpoint_url or 'AWS S3'}"
                 if object_store is not None else f"the folder {blob_dir}")
        raise BlobStoreUnreachable(f"the blob store in {where} cannot be used: {exc}") from exc
    if store is not None:
        store.close()


def _folder_or_bucket(prefix: str, *, max_bytes: int, blob_dir: Path | None,
                      object_store: ObjectStoreSettings | None) -> BlobStore | None:
    """The services' store when the settings name a bucket or a folder; None: in Redis."""
    if object_store is not None:
        return _object_store_class().create(object_store.bucket, prefix, max_bytes=max_bytes,
                                            endpoint_url=object_store.endpoint_url, region=object_store.region)
    if blob_dir is not None:
        return FolderBlobStore.create(blob_dir / prefix, max_bytes=max_bytes)
    return None


def _object_store_class() -> type[ObjectBlobStore]:
    """``bus/blob_objects.py``'s store, whose S3 client (boto3) is an optional dependency."""
    try:
        module = importlib.import_module("federated_learning.bus.blob_objects")
    except ModuleNotFoundError as exc:
        raise BlobStoreUnreachable(
            f"this deployment keeps its blobs in an S3 bucket, and {exc.name} is not installed here: "
            "pip install 'federated-learning[s3]'") from exc
    return cast("type[ObjectBlobStore]", module.ObjectBlobStore)


async def publish_blob_store(redis: aioredis.Redis, keys: Keys, store: BlobStore) -> None:
    """Tell agents where the blobs are (the coordinator, when it starts); a change is logged, as
    running agents keep the store they found until they restart."""
    described = store.describe().model_dump_json()
    before = cast("bytes | None", await redis.set(keys.blob_store, described, get=True))
    if before is not None and read_descriptor(before) != store.describe():
        log.warning("the deployment's blob store changes from %s to %s: restart the agents, and stop the "
                    "trainings whose blobs stay behind", text(before), described)


async def agent_blob_store(redis: aioredis.Redis, keys: Keys, *, max_bytes: int,
                           blob_folder: Path | None = None,
                           blob_endpoint_url: str | None = None) -> tuple[BlobStore, bool]:
    """The store the deployment published, and whether it published one (Redis until it does).

    ``blob_folder``: the deployment's ``blob_dir`` as mounted where the agent runs, when not at the
    path the services see (the deployment's own folder is ``<blob_folder>/<prefix>``).
    ``blob_endpoint_url``: the object store's URL as reached from here, when not the one the
    services use. The folder's or bucket's ``store.json`` must hold the published id, else
    :class:`BlobStoreUnreachable` says what is wrong.
    """
    descriptor = read_descriptor(await redis.get(keys.blob_store))
    if descriptor is None:
        return RedisBlobStore(redis, keys, max_bytes=max_bytes), False
    if descriptor.kind == "redis":
        return RedisBlobStore(redis, keys, max_bytes=max_bytes), True
    if descriptor.kind == "s3":
        return await asyncio.to_thread(_agent_object_store, descriptor, keys, max_bytes, blob_endpoint_url), True
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


def _agent_object_store(descriptor: BlobStoreDescriptor, keys: Keys, max_bytes: int,
                        endpoint_url: str | None) -> BlobStore:
    """The published bucket, reached at ``endpoint_url`` when given; its id checked."""
    assert descriptor.bucket is not None
    endpoint = endpoint_url or descriptor.endpoint_url
    store = _object_store_class()(descriptor.bucket, keys.prefix, max_bytes=max_bytes, endpoint_url=endpoint,
                                  region=descriptor.region, store_id=descriptor.store_id)
    where = f"s3://{descriptor.bucket}/{keys.prefix}/ at {endpoint or 'AWS S3'}"
    try:
        found = store.read_id()
    except BlobStoreError as exc:
        store.close()
        raise BlobStoreUnreachable(
            f"this deployment keeps its models and uploads in {where} (store id {descriptor.store_id}), and "
            f"this agent cannot read it: {exc}. Give it credentials (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), pass the store's URL as reached from here as "
            "blob_endpoint_url, or train through the HTTP gateway (/sync_model)") from exc
    if found != descriptor.store_id:
        store.close()
        what = "has no store.json" if found is None else f"belongs to another deployment (store id {found})"
        raise BlobStoreUnreachable(
            f"this deployment keeps its models and uploads in {where} (store id {descriptor.store_id}), and "
            f"what this agent reaches there {what}: pass the services' object store as blob_endpoint_url")
    return store
