"""The dashboard's REST API over a real valkey-server (ASGI in-process)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from federated_learning.dashboard.live import Subscriber, to_pushes
from federated_learning.dashboard.main import create_app
from federated_learning.protocol.events import Event
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import StartTraining, VersionRecord, decode
from federated_learning.services.runtime import ServiceContext
from tests.integration.conftest import TEST_API_KEY, digits_config, start_training, wait_for_status

KEYS = Keys()
BODY = {"dataset": "digits", "model": {"trainer": "softmax", "num_features": 64, "num_classes": 10},
        "rounds": 2}


@pytest.fixture
async def http(redis: aioredis.Redis, settings) -> AsyncIterator[httpx.AsyncClient]:
    ctx = ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0")
    app = create_app(ctx)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                 headers={"X-API-Key": TEST_API_KEY}) as client:
        yield client


async def test_start_puts_a_validated_command_on_the_control_stream(http: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    response = await http.post("/api/training/start", json={**BODY, "training_id": "abc"})
    assert response.status_code == 202
    assert response.json()["training_id"] == "abc"
    [(_id, fields)] = await redis.xrange(KEYS.control_stream)
    command = decode(StartTraining, fields)
    assert command.training_id == "abc" and command.config.rounds == 2


@pytest.mark.parametrize("body", [
    {**BODY, "rounds": 0},
    {**BODY, "model": {"trainer": "cnn", "num_features": 64, "num_classes": 10}},
    {**BODY, "min_clients": 9, "clients_per_round": 3},
    {**BODY, "surprise": 1},
    {"dataset": "digits"},
    {**BODY, "algorithm_params": {"eta": True}},
    {**BODY, "algorithm_params": {"eta": float("nan")}},
    {**BODY, "algorithm_params": {"eta": float("inf")}},
    {**BODY, "algorithm_params": {"eta": 1e300}},
    {**BODY, "algorithm_params": {"eta": "x" * 65}},
])
async def test_invalid_start_body_is_rejected_counted_and_changes_nothing(
        http: httpx.AsyncClient, redis: aioredis.Redis, body: dict) -> None:
    # json.dumps writes NaN and Infinity as a lax client would; httpx's json= would refuse them.
    response = await http.post("/api/training/start", content=json.dumps(body),
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"]
    assert await redis.xlen(KEYS.control_stream) == 0
    assert int(await redis.hget(KEYS.rejections, "rest:invalid_body")) == 1


async def test_unknown_training_is_404(http: httpx.AsyncClient) -> None:
    for path in ("/api/training/nope/status", "/api/training/nope/metrics", "/api/training/nope/versions"):
        response = await http.get(path)
        assert response.status_code == 404
        assert "no training 'nope'" in response.json()["detail"]
    assert (await http.post("/api/training/nope/stop")).status_code == 404


async def test_status_metrics_and_model_of_a_finished_training(
        http: httpx.AsyncClient, redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(4)
    await start_training(redis, "done", digits_config(rounds=2))
    await wait_for_status(redis, "done", {"completed"})

    status = (await http.get("/api/training/done/status")).json()
    assert status["status"] == "completed" and status["current_version"] == 2
    assert [m["round"] for m in (await http.get("/api/training/done/metrics")).json()] == [1, 2]
    model = await http.get("/api/training/done/versions/2/model")
    assert model.status_code == 200 and model.headers["content-type"] == "application/octet-stream"
    agents = (await http.get("/api/agents")).json()
    assert len(agents) == 4 and all(a["alive"] for a in agents)
    board = (await http.get("/api/agents/leaderboard")).json()
    assert [row["rank"] for row in board] == [1, 2, 3, 4]
    assert sum(row["completed"] for row in board) >= 8 and sum(row["contribution"] for row in board) == pytest.approx(1.0, abs=1e-3)
    assert (await http.get("/api/health")).json()["status"] == "ok"


async def test_page_and_assets_are_served_locally(http: httpx.AsyncClient) -> None:
    page = await http.get("/")
    assert page.status_code == 200 and 'id="chart"' in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN
    for asset in ("/static/app.js", "/static/vendor/uPlot.iife.min.js"):
        assert (await http.get(asset)).status_code == 200, asset


def test_round_completed_becomes_round_and_metric_pushes() -> None:
    data = {"version": 3, "attempts": 1, "participants": 4, "selected": 4, "num_examples": 40, "train_loss": None,
            "train_accuracy": None, "eval_loss": None, "eval_accuracy": 0.9, "eval_of_version": 2,
            "round_seconds": 1.0, "aggregation_seconds": 0.0, "epsilon_spent": 0.0, "completed_at": 0.0}
    event = Event(kind="round_completed", source="coordinator", training_id="t", round=3, data=data)
    assert [p["type"] for p in to_pushes(event)] == ["round_completed", "metric_update"]


def test_slow_subscriber_drops_instead_of_blocking() -> None:
    subscriber = Subscriber("slow")
    for _ in range(subscriber.queue.maxsize + 5):
        subscriber.offer({"type": "x"})
    assert subscriber.dropped == 5


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong-key-0123456789"}, {"Authorization": "Bearer nope"}])
async def test_control_endpoints_need_the_api_key_and_change_nothing_without_it(
        http: httpx.AsyncClient, redis: aioredis.Redis, headers: dict[str, str]) -> None:
    from federated_learning.monitoring.alerts import Alert

    alert = Alert(alert_id="a1", key="k", rule="service_down", severity="critical", message="m", action="x")
    await redis.hset(KEYS.alerts, "a1", alert.model_dump_json())
    http.headers.pop("X-API-Key")
    for method, path, body in (("POST", "/api/training/start", BODY), ("POST", "/api/training/t/stop", None),
                               ("POST", "/api/training/t/rollback", {"version": 0}),
                               ("POST", "/api/alerts/a1/acknowledge", None)):
        response = await http.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, path
    assert await redis.xlen(KEYS.control_stream) == 0
    assert int(await redis.hget(KEYS.rejections, "rest:unauthorized")) == 4
    stored = Alert.model_validate_json(await redis.hget(KEYS.alerts, "a1"))
    assert stored.is_open and stored.acknowledged is False


async def test_bearer_token_is_accepted(http: httpx.AsyncClient) -> None:
    http.headers.pop("X-API-Key")
    response = await http.post("/api/training/start", json=BODY, headers={"Authorization": f"Bearer {TEST_API_KEY}"})
    assert response.status_code == 202


async def test_compare_and_rollback_of_versions(http: httpx.AsyncClient, redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(4)
    await start_training(redis, "cmp", digits_config(rounds=2))
    await wait_for_status(redis, "cmp", {"completed"})

    same = (await http.get("/api/training/cmp/versions/compare", params={"a": 1, "b": 1})).json()
    assert same["l2_distance"] == 0.0 and same["cosine_similarity"] == pytest.approx(1.0)
    diff = (await http.get("/api/training/cmp/versions/compare", params={"a": 0, "b": 2})).json()
    assert diff["l2_distance"] > 0 and [layer["name"] for layer in diff["layers"]] == ["dense.weight", "dense.bias"]
    assert "accuracy" in diff["metric_deltas"]
    assert (await http.get("/api/training/cmp/versions/compare", params={"a": 0, "b": 9})).status_code == 404
    assert (await http.post("/api/training/cmp/rollback", json={"version": 9})).status_code == 404
    assert (await http.post("/api/training/cmp/rollback", json={"version": 1})).status_code == 202


async def test_acknowledging_an_alert(http: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    from federated_learning.monitoring.alerts import Alert

    alert = Alert(alert_id="a1", key="k", rule="service_down", severity="critical", message="m", action="x")
    await redis.hset(KEYS.alerts, "a1", alert.model_dump_json())
    response = await http.post("/api/alerts/a1/acknowledge")
    assert response.status_code == 200 and response.json()["acknowledged"] is True
    assert (await http.post("/api/alerts/zz/acknowledge")).status_code == 404


async def test_retention_prunes_old_checkpoints_and_a_corrupt_one_is_never_served(
        redis: aioredis.Redis, system, make_agents, settings) -> None:
    system.settings = settings.model_copy(update={"checkpoint_keep_last": 2, "checkpoint_keep_best": 1})
    await system.start()
    await make_agents(4)
    await start_training(redis, "keep", digits_config(rounds=5))
    await wait_for_status(redis, "keep", {"completed"})
    app_settings = system.settings

    versions = (await http_get_versions(redis))
    pruned = [v.version for v in versions if v.pruned_at is not None]
    kept = [v.version for v in versions if v.pruned_at is None]
    assert pruned and 0 in kept and 5 in kept and len(kept) <= 1 + 2 + 1
    checkpoints = app_settings.data_dir / "checkpoints" / "keep"
    assert all(not (checkpoints / f"v{v:06d}.safetensors").exists() for v in pruned)

    ctx = ServiceContext(redis=redis, settings=app_settings, service="dashboard", instance="0")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://t",
                                 headers={"X-API-Key": TEST_API_KEY}) as http:
        assert (await http.get(f"/api/training/keep/versions/{pruned[0]}/model")).status_code == 410
        record = next(v for v in versions if v.version == 0)
        await redis.delete(KEYS.blob(record.model_digest))
        (checkpoints / "v000000.safetensors").write_bytes(b"tampered")
        response = await http.get("/api/training/keep/versions/0/model")
    assert response.status_code == 410 and "fails its hash" in response.json()["detail"]
    kinds = [decode(Event, f).kind for _id, f in await redis.xrange(KEYS.event_stream)]
    assert "checkpoint_corrupt" in kinds and "checkpoints_pruned" in kinds


async def http_get_versions(redis: aioredis.Redis) -> list[VersionRecord]:
    return [VersionRecord.model_validate_json(v) for v in (await redis.hgetall(KEYS.versions("keep"))).values()]


async def test_join_tokens_are_created_listed_and_revoked_by_the_operator(http: httpx.AsyncClient) -> None:
    created = await http.post("/api/join-tokens", json={"label": "lab", "max_uses": 5})
    assert created.status_code == 201
    token, token_id = created.json()["token"], created.json()["token_id"]
    listed = (await http.get("/api/join-tokens")).json()
    assert [t["token_id"] for t in listed] == [token_id] and token not in str(listed)
    assert (await http.delete(f"/api/join-tokens/{token_id}")).status_code == 200
    assert (await http.delete(f"/api/join-tokens/{token_id}")).status_code == 404
    http.headers.pop("X-API-Key")
    assert (await http.post("/api/join-tokens", json={})).status_code == 401


async def test_privacy_budget_per_round(http: httpx.AsyncClient, redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(4)
    await start_training(redis, "budget", digits_config(rounds=2, privacy_level="low"))
    await start_training(redis, "open", digits_config(rounds=1, privacy_level="none"))
    await wait_for_status(redis, "budget", {"completed"})
    await wait_for_status(redis, "open", {"completed"})

    budget = (await http.get("/api/training/budget/privacy")).json()
    assert budget["level"] == "low" and budget["epsilon_target"] == 8.0
    assert 0 < budget["epsilon_spent"] <= 8.0
    assert budget["remaining"] == pytest.approx(8.0 - budget["epsilon_spent"])
    assert [r["round"] for r in budget["per_round"]] == [1, 2]
    assert budget["per_round"][0]["epsilon_spent"] < budget["per_round"][1]["epsilon_spent"]
    assert (await http.get("/api/training/open/privacy")).json()["epsilon_target"] is None
