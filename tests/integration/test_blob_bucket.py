"""A deployment that keeps its blobs in an S3 bucket (``blob_bucket``): agents find it by
themselves, models and uploads never enter Redis, and a round's uploads are deleted when it
commits. The bucket is served over HTTP by an S3 server of its own (``tests/conftest.py``)."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
import redis.asyncio as aioredis

from agents.client import FederatedClient
from federated_learning.bus.blob_objects import ObjectBlobStore
from federated_learning.bus.blob_stores import BlobStoreUnreachable
from federated_learning.config import Settings
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import VersionRecord
from federated_learning.protocol.storage import BlobStoreDescriptor
from federated_learning.protocol.tensors import decode_layers
from federated_learning.services.runtime import open_context
from tests.integration.conftest import digits_config, start_training, wait_for_status, wait_until

KEYS = Keys()


@pytest.fixture
def settings(settings: Settings, s3_endpoint: str, s3_bucket: str) -> Settings:
    return settings.model_copy(update={"blob_bucket": s3_bucket, "blob_endpoint_url": s3_endpoint})


async def test_a_training_through_a_bucket_keeps_no_blob_in_redis(
        redis: aioredis.Redis, system, make_agents, settings: Settings, s3_endpoint: str, s3_bucket: str) -> None:
    await system.start()
    agents = await make_agents(6)
    await start_training(redis, "t1", digits_config(rounds=3))
    state = await wait_for_status(redis, "t1", {"completed", "failed"})
    assert state.status == "completed", state.reason

    store = ObjectBlobStore(s3_bucket, KEYS.prefix, max_bytes=settings.max_blob_bytes, endpoint_url=s3_endpoint)
    published = BlobStoreDescriptor.model_validate_json(await redis.get(KEYS.blob_store))
    assert published == BlobStoreDescriptor(kind="s3", bucket=s3_bucket, endpoint_url=s3_endpoint,
                                            store_id=store.read_id())
    assert all(isinstance(agent.blobs, ObjectBlobStore) and agent.blobs.describe() == published for agent in agents)

    records = [VersionRecord.model_validate_json(raw) for raw in (await redis.hgetall(KEYS.versions("t1"))).values()]
    assert sorted(r.version for r in records) == [0, 1, 2, 3]
    for record in records:  # every version's model is a whole, verified object
        assert set(decode_layers(await store.get(record.model_digest), max_bytes=settings.max_blob_bytes)) == {
            "dense.weight", "dense.bias"}
    assert [key async for key in redis.scan_iter(match=f"{KEYS.prefix}:blob:*")] == [KEYS.blob_store.encode()]
    assert [key async for key in redis.scan_iter(match=KEYS.upload_pattern())] == []

    s3 = boto3.session.Session().client("s3", endpoint_url=s3_endpoint)
    uploads = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"{KEYS.prefix}/upload/").get("Contents", [])
    probes = [entry for entry in uploads if entry["Size"] == 0]  # each agent's check that it may write
    assert uploads == probes and len(probes) == 6, "every round's uploads are deleted when it commits"
    store.close()


async def test_an_agent_reaches_the_bucket_at_its_own_url_and_refuses_another_store(
        redis: aioredis.Redis, redis_url: str, system, s3_endpoint: str, s3_bucket: str) -> None:
    """``blob_endpoint_url`` is the store as the agent reaches it; a store it cannot reach, or one
    holding another deployment's id, is refused with the reason before the agent trains for nothing."""
    await system.start("coordinator")
    await wait_until(lambda: redis.exists(KEYS.blob_store), "the coordinator publishing its blob store")
    here = s3_endpoint.replace("127.0.0.1", "localhost")  # the same store under another name
    agent = FederatedClient("agent-near", redis_url=redis_url, blob_endpoint_url=here)
    await agent.initialize()
    try:
        assert isinstance(agent.blobs, ObjectBlobStore) and agent.blobs.endpoint_url == here
        digest = await agent.upload(b"an update")
        assert await system.contexts["coordinator"].blobs.get(digest, owner="agent-near") == b"an update"
    finally:
        await agent.close()

    far = FederatedClient("agent-far", redis_url=redis_url, blob_endpoint_url="http://127.0.0.1:9")
    with pytest.raises(BlobStoreUnreachable, match="/sync_model"):
        await far.initialize()
    await far.close()

    s3: Any = boto3.session.Session().client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=s3_bucket, Key=f"{KEYS.prefix}/store.json", Body=b'{"store_id": "' + b"0" * 32 + b'"}')
    stranger = FederatedClient("agent-elsewhere", redis_url=redis_url)
    with pytest.raises(BlobStoreUnreachable, match=f"another deployment \\(store id {'0' * 32}\\)"):
        await stranger.initialize()
    await stranger.close()


async def test_a_service_whose_bucket_does_not_exist_stops_with_the_reason(
        redis: aioredis.Redis, redis_url: str, settings: Settings) -> None:
    missing = settings.model_copy(update={"blob_bucket": "no-such-bucket"})
    with pytest.raises(SystemExit, match="monitor/0: cannot open the deployment's blob store: .*NoSuchBucket"):
        await open_context(missing, "monitor", "0", redis_url=redis_url)
