"""The version manager's Python API against a real valkey-server (and, for rollback, the running pipeline)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from agents.client import FederatedClient
from federated_learning.config import Settings
from federated_learning.coordination.state import TrainingState
from federated_learning.dashboard.main import create_app
from federated_learning.model_versions import (
    ModelVersionManager,
    UnknownTraining,
    UnknownVersion,
    VersionUnavailable,
)
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import (
    ModelReleased,
    PrivacyReport,
    RollbackTraining,
    RoundMetrics,
    VersionCommitted,
    decode,
)
from federated_learning.protocol.tensors import digest_of, encode_layers
from federated_learning.records.trainings import TrainingStore
from federated_learning.services.runtime import ServiceContext
from tests.integration.conftest import (
    TEST_API_KEY,
    System,
    digits_config,
    start_training,
    wait_for_status,
)

MakeAgents = Callable[..., Awaitable[list[FederatedClient]]]

KEYS = Keys()


def model_bytes(*weights: float) -> bytes:
    return encode_layers({"w": np.array(weights, dtype=np.float32)})


def release(round_number: int, data: bytes, parent: int | None, training_id: str = "t1") -> ModelReleased:
    return ModelReleased(training_id=training_id, round=round_number, parent_version=parent,
                         model_digest=digest_of(data), contributors=["agent-000", "agent-001"],
                         num_examples=40, algorithm="fedavg",
                         privacy=PrivacyReport(level="none", mechanism="none"))


async def stream_entries(redis: aioredis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", await redis.xrange(stream))
    return [fields for _id, fields in entries]


async def events(redis: aioredis.Redis, kind: str) -> list[dict[str, Any]]:
    entries = [json.loads(fields[b"m"]) for fields in await stream_entries(redis, KEYS.event_stream)]
    return [e for e in entries if e["kind"] == kind]


async def add_training(redis: aioredis.Redis, training_id: str = "t1") -> None:
    state = TrainingState(training_id=training_id, config=digits_config(), min_clients=2, clients_per_round=4,
                          round_deadline_s=10.0, privacy_level="none")
    await TrainingStore(redis, KEYS).create(state, queued=False)


def metrics_row(round_number: int, version: int, eval_of: int, accuracy: float, loss: float) -> str:
    return RoundMetrics(training_id="t1", round=round_number, version=version, attempts=1, participants=2,
                        selected=2, num_examples=40, train_loss=None, train_accuracy=None, eval_loss=loss,
                        eval_accuracy=accuracy, eval_of_version=eval_of, round_seconds=1.0,
                        aggregation_seconds=0.1, epsilon_spent=0.0, completed_at=0.0).model_dump_json()


@pytest.fixture
def api(redis: aioredis.Redis, settings: Settings) -> ModelVersionManager:
    return ModelVersionManager.for_redis(redis, settings)


async def test_create_model_version_writes_the_checkpoint_records_and_announces_it(
        api: ModelVersionManager, redis: aioredis.Redis, settings: Settings) -> None:
    first, second = model_bytes(1, 2), model_bytes(3, 4)

    v0 = await api.create_model_version("t1", release(0, first, None), first)
    v1 = await api.create_model_version("t1", release(1, second, 0), second)

    assert (v0, v1) == (0, 1)
    folder = settings.data_dir / "checkpoints" / "t1"
    assert (folder / "v000001.safetensors").read_bytes() == second
    assert json.loads((folder / "v000001.json").read_text())["parent_version"] == 0
    assert [r.version for r in await api.history("t1")] == [0, 1]
    announced = [decode(VersionCommitted, f) for f in await stream_entries(redis, KEYS.version_stream)]
    assert [(a.version, a.round, a.model_digest) for a in announced] == [(0, 0, digest_of(first)),
                                                                          (1, 1, digest_of(second))]
    assert [e["data"]["version"] for e in await events(redis, "version_committed")] == [0, 1]


async def test_a_round_committed_again_keeps_its_version_and_is_only_re_announced(
        api: ModelVersionManager, redis: aioredis.Redis) -> None:
    data = model_bytes(1, 2)
    await api.create_model_version("t1", release(0, data, None), data)

    again = await api.create_model_version("t1", release(0, data, None))

    assert again == 0
    assert await redis.hlen(KEYS.versions("t1")) == 1
    assert await redis.xlen(KEYS.version_stream) == 2
    assert len(await events(redis, "version_committed")) == 1


async def test_create_model_version_refuses_a_release_for_another_training_or_other_bytes(
        api: ModelVersionManager, redis: aioredis.Redis) -> None:
    data = model_bytes(1, 2)

    with pytest.raises(ValueError, match="not 't1'"):
        await api.create_model_version("t1", release(0, data, None, training_id="t2"), data)
    with pytest.raises(ValueError, match="hash_mismatch|do not match"):
        await api.create_model_version("t1", release(0, data, None), model_bytes(9, 9))

    assert await redis.hlen(KEYS.versions("t1")) == 0


async def test_get_model_version_falls_back_to_the_checkpoint_and_never_serves_a_corrupt_one(
        api: ModelVersionManager, redis: aioredis.Redis, settings: Settings) -> None:
    data = model_bytes(1, 2)
    await api.create_model_version("t1", release(0, data, None), data)
    await redis.delete(KEYS.blob(digest_of(data)))

    model = await api.get_model_version(0, "t1")
    (settings.data_dir / "checkpoints" / "t1" / "v000000.safetensors").write_bytes(model_bytes(6, 6))

    assert model.data == data
    np.testing.assert_array_equal(model.layers(settings.max_blob_bytes)["w"], [1.0, 2.0])
    with pytest.raises(VersionUnavailable, match="fails its hash"):
        await api.get_model_version(0, "t1")
    assert len(await events(redis, "checkpoint_corrupt")) == 1
    with pytest.raises(UnknownVersion):
        await api.get_model_version(5, "t1")


async def test_compare_versions_gives_distances_and_metric_deltas(
        api: ModelVersionManager, redis: aioredis.Redis) -> None:
    await add_training(redis)
    for number, (weights, parent) in enumerate([((3.0, 0.0), None), ((0.0, 4.0), 0)]):
        data = model_bytes(*weights)
        await api.create_model_version("t1", release(number, data, parent), data)
    await redis.rpush(KEYS.training_metrics("t1"), metrics_row(1, 1, 0, 0.5, 1.0), metrics_row(2, 2, 1, 0.75, 0.5))

    diff = await api.compare_versions("t1", 0, 1)

    assert diff.l2_distance == pytest.approx(5.0)
    assert diff.cosine_similarity == pytest.approx(0.0)
    assert diff.relative_distance == pytest.approx(5.0 / 4.0)
    assert diff.metric_deltas == pytest.approx({"accuracy": 0.25, "loss": -0.5})
    with pytest.raises(UnknownTraining):
        await api.compare_versions("nope", 0, 1)


async def test_lineage_follows_parents_past_a_rollback(api: ModelVersionManager) -> None:
    for number, parent in enumerate([None, 0, 1, 1]):
        data = model_bytes(float(number), 0.0)
        await api.create_model_version("t1", release(number, data, parent), data)

    lineage = await api.lineage("t1", 3)

    assert [r.version for r in lineage] == [3, 1, 0]
    assert [r.version for r in await api.history("t1")] == [0, 1, 2, 3]
    with pytest.raises(UnknownVersion):
        await api.lineage("t1", 4)


async def test_lineage_carries_each_evaluated_versions_accuracy_and_loss(
        api: ModelVersionManager, redis: aioredis.Redis, settings: Settings) -> None:
    await add_training(redis)
    for number, parent in enumerate([None, 0, 1]):
        data = model_bytes(float(number), 0.0)
        await api.create_model_version("t1", release(number, data, parent), data)
    await redis.rpush(KEYS.training_metrics("t1"), metrics_row(1, 1, 0, 0.5, 1.0), metrics_row(2, 2, 1, 0.75, 0.5))
    app = create_app(ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0"))

    lineage = await api.lineage("t1", 2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                 headers={"X-API-Key": TEST_API_KEY}) as http:
        served = (await http.get("/api/training/t1/versions/2/lineage")).json()

    assert [(r.version, r.metrics) for r in lineage] == [
        (2, None), (1, {"accuracy": 0.75, "loss": 0.5}), (0, {"accuracy": 0.5, "loss": 1.0})]
    assert [r["metrics"] for r in served] == [r.metrics for r in lineage]
    assert all(r.metrics is None for r in await api.history("t1"))


async def test_rollback_to_version_takes_the_operator_path_and_the_training_continues_from_it(
        api: ModelVersionManager, redis: aioredis.Redis, system: System, make_agents: MakeAgents) -> None:
    await system.start()
    await make_agents(4)
    await start_training(redis, "manual", digits_config(rounds=5))
    state = await wait_for_status(redis, "manual", {"running"})
    while state.completed_rounds < 2:
        state = await wait_for_status(redis, "manual", {"running"})
    with pytest.raises(UnknownVersion):
        await api.rollback_to_version("manual", 99)
    with pytest.raises(UnknownTraining):
        await api.rollback_to_version("nope", 0)

    target = await api.rollback_to_version("manual", 1, reason="test rollback")

    assert target == 1
    commands = [json.loads(f[b"m"]) for f in await stream_entries(redis, KEYS.control_stream)]
    [command] = [RollbackTraining.model_validate(c) for c in commands if c["type"] == "rollback_training"]
    assert (command.training_id, command.version, command.reason) == ("manual", 1, "test rollback")
    final = await wait_for_status(redis, "manual", {"completed", "failed"})
    assert final.status == "completed", final.reason
    [rollback] = await events(redis, "rollback")
    assert rollback["data"]["to_version"] == 1 and rollback["data"]["automatic"] is False
    assert [r.version for r in await api.lineage("manual", final.current_version or 0)][-2:] == [1, 0]


async def test_rest_lineage_and_version_errors_come_from_the_api(
        api: ModelVersionManager, redis: aioredis.Redis, settings: Settings) -> None:
    await add_training(redis)
    for number, parent in enumerate([None, 0, 1, 1]):
        data = model_bytes(float(number), 1.0)
        await api.create_model_version("t1", release(number, data, parent), data)
    await redis.delete(KEYS.blob(digest_of(model_bytes(2.0, 1.0))))
    (settings.data_dir / "checkpoints" / "t1" / "v000002.safetensors").unlink()
    app = create_app(ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                 headers={"X-API-Key": TEST_API_KEY}) as http:
        lineage = await http.get("/api/training/t1/versions/3/lineage")
        unknown = await http.get("/api/training/t1/versions/9/lineage")
        gone = await http.get("/api/training/t1/versions/2/model")
        served = await http.get("/api/training/t1/versions/3/model")

    assert lineage.status_code == 200 and [r["version"] for r in lineage.json()] == [3, 1, 0]
    assert unknown.status_code == 404 and unknown.json()["detail"] == "no version 9 of 't1'"
    assert gone.status_code == 410 and "unavailable" in gone.json()["detail"]
    assert served.content == model_bytes(3.0, 1.0)
    assert served.headers["X-Model-SHA256"] == digest_of(model_bytes(3.0, 1.0))
