"""A deployment that keeps its blobs in a folder (``blob_dir``): agents find it by themselves,
models and uploads never enter Redis, and a round's uploads are deleted when it commits."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from agents.client import FederatedClient
from federated_learning.bus.blob_files import FolderBlobStore
from federated_learning.bus.blob_stores import BlobStoreUnreachable
from federated_learning.config import Settings
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import VersionRecord
from federated_learning.protocol.storage import BlobStoreDescriptor, read_descriptor
from federated_learning.protocol.tensors import decode_layers
from federated_learning.services.runtime import ServiceContext, warn_if_another_blob_store
from tests.integration.conftest import digits_config, start_training, wait_for_status, wait_until

KEYS = Keys()


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"blob_dir": tmp_path / "blobs"})


async def test_a_training_through_a_blob_folder_keeps_no_blob_in_redis(
        redis: aioredis.Redis, system, make_agents, settings: Settings) -> None:
    await system.start()
    agents = await make_agents(6)
    await start_training(redis, "t1", digits_config(rounds=3))
    state = await wait_for_status(redis, "t1", {"completed", "failed"})
    assert state.status == "completed", state.reason

    root = settings.blob_dir / KEYS.prefix
    published = BlobStoreDescriptor.model_validate_json(await redis.get(KEYS.blob_store))
    assert published == BlobStoreDescriptor(kind="folder", path=str(root),
                                             store_id=FolderBlobStore(root, max_bytes=1024).read_id())
    assert all(isinstance(agent.blobs, FolderBlobStore) and agent.blobs.root == root for agent in agents)

    records = [VersionRecord.model_validate_json(raw) for raw in (await redis.hgetall(KEYS.versions("t1"))).values()]
    assert sorted(r.version for r in records) == [0, 1, 2, 3]
    store = FolderBlobStore(root, max_bytes=settings.max_blob_bytes)
    for record in records:  # every version's model is a whole, verified file
        assert set(decode_layers(await store.get(record.model_digest), max_bytes=settings.max_blob_bytes)) == {
            "dense.weight", "dense.bias"}
    assert [key async for key in redis.scan_iter(match=f"{KEYS.prefix}:blob:*")] == [KEYS.blob_store.encode()]
    assert [key async for key in redis.scan_iter(match=KEYS.upload_pattern())] == []
    uploads = [path for path in (root / "upload").rglob("*") if path.is_file()]
    assert uploads == [], "every round's uploads are deleted when it commits"


async def test_an_agent_finds_the_folder_where_it_is_mounted_and_refuses_another(
        redis: aioredis.Redis, redis_url: str, system, settings: Settings, tmp_path: Path) -> None:
    """``blob_folder`` is the agent's mount of ``blob_dir``; a folder with another deployment's
    ``store.json`` (or none) is refused with the reason, before the agent trains for nothing."""
    await system.start("coordinator")
    await wait_until(lambda: redis.exists(KEYS.blob_store), "the coordinator publishing its blob store")
    mount = tmp_path / "mounted-here"
    mount.symlink_to(settings.blob_dir, target_is_directory=True)  # the same folder at another path
    agent = FederatedClient("agent-mounted", redis_url=redis_url, blob_folder=mount)
    await agent.initialize()
    try:
        assert isinstance(agent.blobs, FolderBlobStore) and agent.blobs.root == mount / KEYS.prefix
        digest = await agent.upload(b"an update")
        assert await system.contexts["coordinator"].blobs.get(digest, owner="agent-mounted") == b"an update"
    finally:
        await agent.close()

    other = FolderBlobStore.create(tmp_path / "another-deployment" / KEYS.prefix, max_bytes=1024)
    stranger = FederatedClient("agent-elsewhere", redis_url=redis_url, blob_folder=tmp_path / "another-deployment")
    with pytest.raises(BlobStoreUnreachable, match=f"another deployment \\(store id {other.store_id}\\)"):
        await stranger.initialize()
    await stranger.close()


async def test_an_agent_that_cannot_see_the_folder_says_where_it_is(
        redis: aioredis.Redis, redis_url: str, system, tmp_path: Path) -> None:
    await system.start("coordinator")
    agent = FederatedClient("agent-far", redis_url=redis_url, blob_folder=tmp_path / "not-mounted")
    await wait_until(lambda: redis.exists(KEYS.blob_store), "the coordinator publishing its blob store")
    with pytest.raises(BlobStoreUnreachable, match="/sync_model"):
        await agent.initialize()
    await agent.close()


async def test_a_service_with_another_blob_folder_says_so(
        redis: aioredis.Redis, system, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    await system.start("coordinator")
    await wait_until(lambda: redis.exists(KEYS.blob_store), "the coordinator publishing its blob store")
    same = ServiceContext(redis=redis, settings=settings, service="aggregator", instance="1")
    await warn_if_another_blob_store(same)
    assert "same blob_dir" not in caplog.text
    elsewhere = settings.model_copy(update={"blob_dir": tmp_path / "not-the-shared-folder"})
    await warn_if_another_blob_store(ServiceContext(redis=redis, settings=elsewhere, service="aggregator", instance="2"))
    assert "aggregator/2 keeps blobs in" in caplog.text and "same blob_dir" in caplog.text


async def test_a_descriptor_this_version_cannot_read_is_replaced_not_fatal(
        redis: aioredis.Redis, system, settings: Settings) -> None:
    """An earlier writer's descriptor (here: a folder without its id) neither stops a service
    nor an agent; the coordinator publishes its own when it starts."""
    await redis.set(KEYS.blob_store, b'{"kind": "folder", "path": "/srv/old"}')
    assert read_descriptor(await redis.get(KEYS.blob_store)) is None
    await warn_if_another_blob_store(ServiceContext(redis=redis, settings=settings, service="monitor", instance="0"))
    await system.start("coordinator")

    async def republished() -> bool:
        descriptor = read_descriptor(await redis.get(KEYS.blob_store))
        return descriptor is not None and descriptor.path == str(settings.blob_dir / KEYS.prefix)

    await wait_until(republished, "the coordinator publishing its blob store over the old one")
