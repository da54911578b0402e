"""Plain-HTTP sync: five HTTP clients and five bus agents in one training."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
from safetensors.numpy import save as save_safetensors

from agents.data import make_client_datasets
from federated_learning.bus.blobs import RedisBlobStore
from federated_learning.coordination.partitions import partition_of
from federated_learning.dashboard.main import create_app
from federated_learning.presets import create_trainer
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import UpdateSubmitted, VersionRecord
from federated_learning.protocol.secure_messages import message_type
from federated_learning.protocol.tensors import decode_layers, encode_layers, validate_layers
from federated_learning.services.runtime import ServiceContext
from tests.integration.conftest import TEST_API_KEY, digits_config, start_training, wait_for_status
from tests.ports import free_port

KEYS = Keys()


@pytest.fixture
async def http(redis: aioredis.Redis, settings):  # type: ignore[no-untyped-def]
    ctx = ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://gw",
                                 headers={"Authorization": f"Bearer {TEST_API_KEY}"}) as client:
        yield client


async def http_client_loop(http: httpx.AsyncClient, client_id: str, x: np.ndarray, y: np.ndarray) -> int:
    """Like a bot: fetch the current model, train locally, post it; once per version."""
    trainer = create_trainer("softmax", num_features=64, num_classes=10)
    synced: set[int] = set()
    while True:
        status = (await http.get("/api/training/http/status")).json()
        if status["status"] in ("completed", "failed", "evaluating", "saving"):
            return len(synced)
        version = status["current_version"]
        if status["phase"] == "collecting" and version is not None and version not in synced:
            model = await http.get(f"/api/training/http/versions/{version}/model")
            weights = decode_layers(model.content, max_bytes=1 << 20)
            local, _ = trainer.train(weights, x, y, epochs=5, batch_size=4, learning_rate=1.0, seed=version)
            response = await http.post("/sync_model", content=encode_layers(dict(local)), headers={
                "Content-Type": "application/octet-stream", "X-Client-Id": client_id, "X-Training-Id": "http",
                "X-Base-Version": str(version), "X-Num-Examples": str(len(y))})
            assert response.status_code == 200, response.text
            assert decode_layers(response.content, max_bytes=1 << 20).keys() == weights.keys()
            synced.add(version)
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("partitions", [1, 2])
async def test_http_clients_and_bus_agents_train_together(redis: aioredis.Redis, system, make_agents, http,
                                                          partitions: int) -> None:
    """With two partitions the training ("http") is in partition 1, whose coordinator may read a
    client's first update before partition 0's has handled its join: the gateway sends the update
    only once the join took effect."""
    assert partition_of("http", 2) == 1
    system.settings = system.settings.model_copy(update={"coordinator_partitions": partitions})
    await system.start()
    await make_agents(5)
    await start_training(redis, "http", digits_config(rounds=3, clients_per_round=10, min_clients=5,
                                                      over_selection=1.0, round_deadline_s=8.0))
    await wait_for_status(redis, "http", {"running"})
    clients, _ = make_client_datasets(10, "iid", 1)
    loops = [asyncio.create_task(http_client_loop(http, f"bot-{i}", c.train.x, c.train.y))
             for i, c in enumerate(clients[5:])]

    state = await wait_for_status(redis, "http", {"completed", "failed"}, timeout_s=90)
    synced = await asyncio.gather(*loops)

    assert state.status == "completed", state.reason
    assert all(n >= 1 for n in synced)
    records = [VersionRecord.model_validate_json(v) for v in (await redis.hgetall(KEYS.versions("http"))).values()]
    contributors = {a for r in records for a in r.contributors}
    assert {f"http-bot-{i}" for i in range(5)} <= contributors
    assert any(a.startswith("agent-") for a in contributors)
    assert await redis.hget(KEYS.rejections, "updates:unknown_agent") is None, "a first update came before its join"
    assert await redis.xlen(KEYS.dead_letters("coordinator")) == 0


async def test_a_first_sync_the_coordinator_does_not_register_in_time_is_answered_503(
        redis: aioredis.Redis, system, make_agents, http, monkeypatch: pytest.MonkeyPatch) -> None:
    from federated_learning.dashboard.routes import sync

    await system.start()
    await make_agents(3)
    await start_training(redis, "http", digits_config(rounds=50))
    await wait_for_status(redis, "http", {"running"})
    await system.stop("coordinator")  # nobody handles the join now
    monkeypatch.setattr(sync, "REGISTRATION_WAIT_S", 0.2)
    body = {"client_id": "new-bot", "weights": {"dense.weight": np.zeros((64, 10)).tolist(), "dense.bias": [0.0] * 10},
            "metrics": {"num_examples": 12}}
    response = await http.post("/sync_model", json=body)
    assert response.status_code == 503 and "sync again" in response.json()["detail"], response.text
    assert response.headers["Retry-After"] == "1"
    assert await redis.hget(KEYS.rejections, "sync:registration_pending") == b"1"
    assert await redis.xlen(KEYS.update_stream) == 0 or not any(
        b"new-bot" in fields[b"m"] for _id, fields in await redis.xrange(KEYS.update_stream)), "no update went out"


async def test_json_sync_is_validated_against_the_model(redis: aioredis.Redis, system, make_agents, http) -> None:
    await system.start()
    await make_agents(3)
    await start_training(redis, "http", digits_config(rounds=50))
    await wait_for_status(redis, "http", {"running"})
    good = {"client_id": "bot", "weights": {"dense.weight": np.zeros((64, 10)).tolist(), "dense.bias": [0.0] * 10},
            "metrics": {"num_examples": 12, "accuracy": 0.5, "loss": 1.2}}
    response = await http.post("/sync_model", json=good)
    assert response.status_code == 200
    body = response.json()
    assert body["training_id"] == "http" and len(body["weights"]["dense.bias"]) == 10

    wrong_shape = {**good, "weights": {"dense.weight": [[0.0] * 3], "dense.bias": [0.0] * 10}}
    assert (await http.post("/sync_model", json=wrong_shape)).status_code == 422
    not_finite = {**good, "weights": {"dense.weight": np.full((64, 10), np.nan).tolist(), "dense.bias": [0.0] * 10}}
    overflowing = json.dumps(not_finite).replace("NaN", "1e400")  # parses to inf
    assert (await http.post("/sync_model", content=overflowing,
                            headers={"Content-Type": "application/json"})).status_code == 422
    assert (await http.post("/sync_model", content=b"garbage", headers={"Content-Type": "application/octet-stream"})).status_code == 422
    assert (await http.post("/sync_model", json={"weights": {}}, headers={"Authorization": "Bearer nope"})).status_code == 401
    counts = {k.decode(): int(v) for k, v in (await redis.hgetall(KEYS.rejections)).items()}
    assert counts.get("sync:bad_shape") == 1 and counts.get("sync:not_finite") == 1 and counts.get("sync:bad_blob") == 1


async def test_a_late_http_update_is_rebased_onto_the_current_version(redis: aioredis.Redis, system, make_agents,
                                                                      http) -> None:
    from federated_learning.protocol.messages import AggregationJob, Task, decode

    await system.start()
    agents = await make_agents(3)
    posted = asyncio.Event()  # the bus agents answer round 2 only after the HTTP update is in
    for agent in agents:
        original = agent.handle_task

        async def gated(fields, *, _original=original) -> None:  # type: ignore[no-untyped-def]
            if message_type(fields) == "task" and decode(Task, fields).round >= 2:
                await asyncio.wait_for(posted.wait(), timeout=30)
            await _original(fields)

        agent.handle_task = gated  # type: ignore[method-assign]
    await start_training(redis, "late", digits_config(rounds=3, clients_per_round=4, min_clients=3,
                                                      round_deadline_s=8.0, max_staleness=1))
    state = await wait_for_status(redis, "late", {"running"})
    while not (state.current_version == 1 and state.phase == "collecting"):
        state = await wait_for_status(redis, "late", {"running"})
    v0 = await http.get("/api/training/late/versions/0/model")
    model = decode_layers(v0.content, max_bytes=1 << 20)
    stale = {name: layer + 0.01 for name, layer in model.items()}  # "trained" from version 0
    headers = {"Content-Type": "application/octet-stream", "X-Client-Id": "slow-bot", "X-Training-Id": "late",
               "X-Num-Examples": "20"}
    response = await http.post("/sync_model", content=encode_layers(stale), headers={**headers, "X-Base-Version": "0"})
    assert response.status_code == 200, response.text
    posted.set()

    state = await wait_for_status(redis, "late", {"completed", "failed"}, timeout_s=90)

    assert state.status == "completed", state.reason
    jobs = [AggregationJob.model_validate_json(f[b"m"]) for _id, f in await redis.xrange(KEYS.job_stream)]
    refs = [ref for job in jobs if job.training_id == "late" for ref in job.updates if ref.agent_id == "http-slow-bot"]
    assert len(refs) == 1 and refs[0].model_version == 0
    record = VersionRecord.model_validate_json(await redis.hget(KEYS.versions("late"), "0"))
    assert refs[0].model_digest == record.model_digest  # the aggregator re-bases it from version 0


async def test_a_client_id_cannot_name_another_projects_volunteer(redis: aioredis.Redis, system, http) -> None:
    await system.start()
    await start_training(redis, "dots", digits_config(rounds=1))
    await wait_for_status(redis, "dots", {"running", "paused"})
    body = {"client_id": "acme.vision.cam1", "training_id": "dots", "weights": {}, "metrics": {"num_examples": 1}}

    response = await http.post("/sync_model", json=body)

    assert response.status_code == 422
    assert "client_id" in response.text
    assert not await redis.hexists(KEYS.agents, "http-acme.vision.cam1")


async def test_http_sync_into_a_secure_training_is_refused(redis: aioredis.Redis, system, make_agents, http) -> None:
    await system.start()
    await start_training(redis, "masked", digits_config(rounds=1, min_clients=3, secure_aggregation=True))
    await wait_for_status(redis, "masked", {"running", "paused"})
    body = {"client_id": "bot-1", "training_id": "masked", "weights": {}, "metrics": {"num_examples": 1}}

    response = await http.post("/sync_model", json=body)

    assert response.status_code == 409
    assert "secure aggregation" in response.json()["detail"]
    assert not await redis.hexists(KEYS.agents, "http-bot-1")


def mlp_config(**overrides: object):  # type: ignore[no-untyped-def]
    return digits_config(model={"trainer": "mlp", "num_features": 64, "num_classes": 10, "hidden": 8}, **overrides)


async def notices(redis: aioredis.Redis) -> list[UpdateSubmitted]:
    return [UpdateSubmitted.model_validate_json(f[b"m"]) for _id, f in await redis.xrange(KEYS.update_stream)]


async def test_a_standard_safetensors_file_in_any_layer_order_is_accepted(redis: aioredis.Redis, system, settings,
                                                                          http) -> None:
    await system.start()
    await start_training(redis, "plain", mlp_config(rounds=50))
    state = await wait_for_status(redis, "plain", {"running", "paused"})
    model = decode_layers((await http.get("/api/training/plain/versions/0/model")).content, max_bytes=1 << 20)
    assert list(model) == ["hidden.weight", "hidden.bias", "output.weight", "output.bias"]
    body = save_safetensors({name: layer + 0.01 for name, layer in model.items()})  # no "order" metadata
    assert list(decode_layers(body, max_bytes=1 << 20)) != list(model)
    headers = {"Content-Type": "application/octet-stream", "X-Client-Id": "plain-bot", "X-Training-Id": "plain"}

    response = await http.post("/sync_model", content=body, headers=headers)

    assert response.status_code == 200, response.text
    [notice] = await notices(redis)
    blobs = RedisBlobStore(redis, KEYS, max_bytes=settings.max_blob_bytes)
    stored = decode_layers(await blobs.get(notice.update_digest, owner=notice.agent_id), max_bytes=1 << 20)
    validate_layers(stored, state.layer_spec)
    np.testing.assert_array_equal(stored["output.bias"], model["output.bias"] + 0.01)
    extra = save_safetensors({**model, "zz.extra": np.zeros(3, model["output.bias"].dtype)})
    refused = await http.post("/sync_model", content=extra, headers=headers)
    assert refused.status_code == 422 and "unexpected ['zz.extra']" in refused.json()["detail"]


async def test_binary_sync_carries_metrics_in_headers(redis: aioredis.Redis, system, http) -> None:
    await system.start()
    await start_training(redis, "metrics", digits_config(rounds=50))
    await wait_for_status(redis, "metrics", {"running", "paused"})
    model = decode_layers((await http.get("/api/training/metrics/versions/0/model")).content, max_bytes=1 << 20)
    headers = {"Content-Type": "application/octet-stream", "X-Client-Id": "eval-bot", "X-Training-Id": "metrics"}
    bad = [("X-Accuracy", "1.5"), ("X-Accuracy", "nan"), ("X-Loss", "-0.1"), ("X-Loss", "inf"),
           ("X-Loss", "low"), ("X-Num-Examples", "0"), ("X-Num-Examples", "2.5")]

    for header, value in bad:
        refused = await http.post("/sync_model", content=encode_layers(model), headers={**headers, header: value})
        assert refused.status_code == 422, (header, value)
        assert refused.json()["detail"].startswith(f"header {header} is '{value}'")
    assert await notices(redis) == []
    response = await http.post("/sync_model", content=encode_layers(model), headers={
        **headers, "X-Num-Examples": "30", "X-Accuracy": "0.75", "X-Loss": "0.5"})

    assert response.status_code == 200, response.text
    [notice] = await notices(redis)
    assert notice.num_examples == 30 and notice.evaluation is not None
    assert (notice.evaluation.accuracy, notice.evaluation.loss) == (0.75, 0.5)
    counts = {k.decode(): int(v) for k, v in (await redis.hgetall(KEYS.rejections)).items()}
    assert counts.get("sync:invalid_header") == len(bad)


async def test_an_oversized_body_is_refused_before_it_is_read(redis: aioredis.Redis, system, settings, http) -> None:
    await system.start()
    await start_training(redis, "big", digits_config(rounds=50))
    await wait_for_status(redis, "big", {"running", "paused"})
    sent: list[int] = []

    async def body(total: int):  # type: ignore[no-untyped-def]
        chunk = b"\0" * 65536
        for _ in range(total // len(chunk)):
            sent.append(len(chunk))
            yield chunk

    headers = {"Content-Type": "application/octet-stream", "X-Client-Id": "big-bot", "X-Training-Id": "big"}
    limit = settings.max_blob_bytes
    declared = await http.post("/sync_model", content=body(8 * limit),
                               headers={**headers, "Content-Length": str(8 * limit)})
    assert declared.status_code == 413 and sent == []
    streamed = await http.post("/sync_model", content=body(8 * limit), headers=headers)  # chunked, no length

    assert streamed.status_code == 413
    assert limit < sum(sent) <= limit + 65536
    assert await notices(redis) == []
    assert not await redis.hexists(KEYS.agents, "http-big-bot")
    counts = {k.decode(): int(v) for k, v in (await redis.hgetall(KEYS.rejections)).items()}
    assert counts.get("sync:too_large") == 2


def run_sync_once(tmp_path: Path, server_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ENABLE_FED_LEARNING": "true", "FED_SERVER_URL": server_url, "FED_CLIENT_ID": "bot-1",
           "FED_LOCAL_MODEL_PATH": str(tmp_path / "model.safetensors"),
           "FED_MERGED_MODEL_PATH": str(tmp_path / "merged.safetensors")}
    return subprocess.run([sys.executable, "-m", "agents.http_sync", "--once", "--attempts", "1"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


def test_sync_once_without_a_server_fails_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(encode_layers({"w": np.ones(3, dtype=np.float32)}))
    url = f"http://127.0.0.1:{free_port()}"

    result = run_sync_once(tmp_path, url)

    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: sync failed: no successful sync after 1 attempts; last: server {url} "
                           "unreachable"), line
    assert not (tmp_path / "merged.safetensors").exists()


def test_sync_once_without_a_local_model_names_the_path(tmp_path: Path) -> None:
    result = run_sync_once(tmp_path, f"http://127.0.0.1:{free_port()}")

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: sync failed: no local model at {tmp_path / 'model.safetensors'} (FED_LOCAL_MODEL_PATH)"]
