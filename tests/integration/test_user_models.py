"""The user's own model through the whole pipeline: uploaded over REST, or taken from the first
agent, of mixed dtypes, trained by agents that run the user's trainer (``agents.app.Trainer``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import ml_dtypes
import numpy as np
import pytest
import redis.asyncio as aioredis
from numpy.typing import NDArray

from agents.app import Config, Metrics, Parameters
from agents.client import FederatedClient
from agents.data import make_client_datasets
from federated_learning.bus.blobs import RedisBlobStore
from federated_learning.dashboard.main import create_app
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.tensors import decode_layers, encode_layers
from federated_learning.services.runtime import ServiceContext
from tests.integration.conftest import TEST_API_KEY, System, wait_for_status

KEYS = Keys()


class SoftmaxTrainer:
    """A user's model in plain NumPy: softmax regression whose layers have the dtypes it is given,
    plus an integer step counter (like BatchNorm's ``num_batches_tracked``)."""

    def __init__(self, x: NDArray[np.float32], y: NDArray[np.int64], x_eval: NDArray[np.float32],
                 y_eval: NDArray[np.int64], *, weight_dtype: Any = np.float32, bias_dtype: Any = np.float64,
                 features: int = 64) -> None:
        self.x, self.y, self.x_eval, self.y_eval = x[:, :features], y, x_eval[:, :features], y_eval
        self.params: dict[str, NDArray[Any]] = {
            "dense.weight": np.zeros((features, 10), weight_dtype), "dense.bias": np.zeros(10, bias_dtype),
            "steps": np.array(0, np.int64)}
        self.num_examples = len(y)

    def get_parameters(self, config: Config) -> Parameters:
        return dict(self.params)

    def _probabilities(self, w: NDArray[np.float64], b: NDArray[np.float64], x: NDArray[Any]) -> NDArray[np.float64]:
        logits = x.astype(np.float64) @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return np.asarray(exp / exp.sum(axis=1, keepdims=True))

    def fit(self, parameters: Parameters, config: Config) -> tuple[Parameters, int, Metrics]:
        w = parameters["dense.weight"].astype(np.float64)
        b = parameters["dense.bias"].astype(np.float64)
        steps = int(parameters["steps"])
        onehot = np.eye(10)[self.y]
        for _ in range(int(config["local_epochs"])):
            grad = self._probabilities(w, b, self.x) - onehot
            w -= 0.5 * self.x.T.astype(np.float64) @ grad / len(self.y)
            b -= 0.5 * grad.mean(axis=0)
            steps += 1
        new = {"dense.weight": w.astype(parameters["dense.weight"].dtype),
               "dense.bias": b.astype(parameters["dense.bias"].dtype), "steps": np.array(steps, np.int64)}
        return new, len(self.y), {"loss": 0.0}

    def evaluate(self, parameters: Parameters, config: Config) -> tuple[float, int, Metrics]:
        p = self._probabilities(parameters["dense.weight"].astype(np.float64),
                                parameters["dense.bias"].astype(np.float64), self.x_eval)
        loss = float(-np.log(p[np.arange(len(self.y_eval)), self.y_eval] + 1e-12).mean())
        return loss, len(self.y_eval), {"accuracy": float((p.argmax(axis=1) == self.y_eval).mean())}


def accuracy_on(test_x: NDArray[Any], test_y: NDArray[Any], model: Mapping[str, NDArray[Any]]) -> float:
    w = model["dense.weight"].astype(np.float64)
    logits = test_x[:, : w.shape[0]].astype(np.float64) @ w + model["dense.bias"].astype(np.float64)
    return float((logits.argmax(axis=1) == test_y).mean())


@pytest.fixture
async def http(redis: aioredis.Redis, settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    ctx = ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://test",
                                 headers={"X-API-Key": TEST_API_KEY}) as client:
        yield client


@pytest.fixture
async def user_agents(redis_url: str, settings: Any) -> AsyncIterator[Any]:
    started: list[FederatedClient] = []

    async def make(count: int, **trainer_options: Any) -> tuple[list[FederatedClient], Any]:
        shards, test = make_client_datasets(count, "iid", 0)
        agents = []
        for shard in shards:
            trainer = SoftmaxTrainer(shard.train.x, shard.train.y, shard.eval.x, shard.eval.y, **trainer_options)
            agents.append(FederatedClient(f"user-{len(started) + len(agents):03d}", redis_url=redis_url,
                                          heartbeat_interval_s=settings.heartbeat_interval_s, trainer=trainer,
                                          dataset="digits", num_examples=trainer.num_examples))
        await asyncio.gather(*(agent.initialize() for agent in agents))
        started.extend(agents)
        return agents, test

    yield make
    await asyncio.gather(*(agent.close() for agent in started), return_exceptions=True)


async def wait_for_alert(http: httpx.AsyncClient, rule: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The open alerts of ``rule``, once the monitor has raised one."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        alerts = [a for a in (await http.get("/api/alerts")).json() if a["rule"] == rule]
        if alerts or asyncio.get_running_loop().time() > deadline:
            return alerts
        await asyncio.sleep(0.05)


def training_body(model: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return {"dataset": "digits", "model": model, "rounds": 3, "clients_per_round": 3, "min_clients": 3,
            "local": {"epochs": 5, "batch_size": 8, "learning_rate": 0.1}, "privacy_level": "none",
            **overrides}


async def final_model(redis: aioredis.Redis, digest: str) -> dict[str, NDArray[Any]]:
    return decode_layers(await RedisBlobStore(redis, KEYS, max_bytes=1 << 24).get(digest), max_bytes=1 << 24)


async def test_an_uploaded_mixed_dtype_model_is_trained_end_to_end(
        system: System, http: httpx.AsyncClient, redis: aioredis.Redis, user_agents: Any) -> None:
    await system.start()
    initial = {"dense.weight": np.zeros((64, 10), np.float32), "dense.bias": np.zeros(10, np.float64),
               "steps": np.array(0, np.int64)}
    uploaded = await http.post("/api/models", content=encode_layers(initial),
                               headers={"Content-Type": "application/octet-stream", "X-Model-Name": "softmax"})
    assert uploaded.status_code == 201, uploaded.text
    record = uploaded.json()
    assert record["layers"] == [{"name": "dense.weight", "shape": [64, 10], "dtype": "float32"},
                                {"name": "dense.bias", "shape": [10], "dtype": "float64"},
                                {"name": "steps", "shape": [], "dtype": "int64"}]
    assert record["parameters"] == 64 * 10 + 10 + 1
    assert (await http.get(f"/api/models/{record['model_id']}")).json()["digest"] == record["digest"]
    _agents, test = await user_agents(3)
    started = await http.post("/api/training/start", json={
        **training_body({"model_id": record["model_id"]}), "training_id": "uploaded"})
    assert started.status_code == 202, started.text
    state = await wait_for_status(redis, "uploaded", {"completed", "failed"}, timeout_s=90)
    assert state.status.value == "completed", state.reason
    assert state.current_digest is not None
    model = await final_model(redis, state.current_digest)
    assert {name: layer.dtype.name for name, layer in model.items()} == {
        "dense.weight": "float32", "dense.bias": "float64", "steps": "int64"}
    assert int(model["steps"]) == 3 * 5  # three rounds of five local epochs: the maximum is carried
    assert accuracy_on(test.x, test.y, model) >= 0.85
    status = (await http.get("/api/training/uploaded/status")).json()
    assert [layer["name"] for layer in status["layers"]] == ["dense.weight", "dense.bias", "steps"]


async def test_a_model_upload_that_is_not_a_model_is_refused_with_the_reason(http: httpx.AsyncClient) -> None:
    bad = encode_layers({"w": np.array([np.nan], np.float32)})
    response = await http.post("/api/models", content=bad, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 422 and "NaN" in response.json()["detail"]
    assert (await http.post("/api/models", content=b"\x00" * 64,
                            headers={"Content-Type": "application/octet-stream"})).status_code == 422
    assert (await http.post("/api/training/start", json=training_body({"model_id": "m-0000000000000000"}))
            ).status_code == 404
    unauthenticated = await http.post("/api/models", content=bad, headers={
        "Content-Type": "application/octet-stream", "X-API-Key": "wrong"})
    assert unauthenticated.status_code == 401


async def test_the_first_agent_fixes_the_layout_and_another_layout_is_refused_with_its_reason(
        system: System, http: httpx.AsyncClient, redis: aioredis.Redis, user_agents: Any) -> None:
    await system.start()
    started = await http.post("/api/training/start", json={
        **training_body({"from_first_agent": True}), "training_id": "first"})
    assert started.status_code == 202
    await wait_for_status(redis, "first", {"initializing"})
    await user_agents(3)
    await user_agents(1, features=32)  # another layout: dense.weight (32, 10)
    state = await wait_for_status(redis, "first", {"completed", "failed"}, timeout_s=90)
    assert state.status.value == "completed", state.reason
    status = (await http.get("/api/training/first/status")).json()
    if status["layers"][0]["shape"] == [32, 10]:
        pytest.fail("the odd agent was asked first; its layout must not win over three others by chance here")
    [refusal] = status["model_refusals"]
    assert refusal["agent_id"] == "user-003" and refusal["source"] == "agent"
    assert "layer 'dense.weight': expected (64, 10) float32, received (32, 10) float32" in refusal["detail"]
    events = [json.loads(fields[b"m"]) for _id, fields in await redis.xrange(KEYS.event_stream)]
    assert any(e["kind"] == "model_refused" and e["agent_id"] == "user-003" for e in events)
    alerts = await wait_for_alert(http, "model_refused")
    assert "agent user-003 cannot take part" in alerts[0]["message"] and alerts[0]["training_id"] == "first"


async def test_half_precision_layers_are_aggregated_within_their_precision(
        system: System, http: httpx.AsyncClient, redis: aioredis.Redis, user_agents: Any) -> None:
    await system.start()
    initial = {"dense.weight": np.zeros((64, 10), np.float16),
               "dense.bias": np.zeros(10, ml_dtypes.bfloat16), "steps": np.array(0, np.int64)}
    record = (await http.post("/api/models", content=encode_layers(initial),
                              headers={"Content-Type": "application/octet-stream"})).json()
    agents, test = await user_agents(3, weight_dtype=np.float16, bias_dtype=ml_dtypes.bfloat16)
    await http.post("/api/training/start", json={**training_body({"model_id": record["model_id"]}, rounds=1),
                                                 "training_id": "half"})
    state = await wait_for_status(redis, "half", {"completed", "failed"}, timeout_s=90)
    assert state.status.value == "completed", state.reason
    assert state.current_digest is not None
    model = await final_model(redis, state.current_digest)
    assert model["dense.weight"].dtype == np.float16 and model["dense.bias"].dtype == ml_dtypes.bfloat16
    # The example-weighted mean of the three agents' own fits from the zero model, in float64.
    fits = [agent.trainer.fit(initial, {"local_epochs": 5}) for agent in agents]  # type: ignore[union-attr]
    counts = np.array([agent.trainer.num_examples for agent in agents], np.float64)  # type: ignore[union-attr]
    for name, dtype in (("dense.weight", np.float16), ("dense.bias", ml_dtypes.bfloat16)):
        exact = sum(c * f[0][name].astype(np.float64) for c, f in zip(counts, fits, strict=True)) / counts.sum()
        got = model[name].astype(np.float64)
        # Within the dtype's precision: the inputs were rounded once to it, the output once more.
        eps = float(np.finfo(dtype).eps)
        assert np.all(np.abs(got - exact) <= 2 * eps * np.maximum(np.abs(exact), 1e-3)), name
    assert accuracy_on(test.x, test.y, model) >= 0.8


async def test_an_http_bot_s_first_sync_fixes_the_layout_and_another_layout_is_refused_over_rest(
        system: System, http: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    await system.start("coordinator", "versions")
    await http.post("/api/training/start", json={**training_body({"from_first_agent": True}), "training_id": "bots"})
    await wait_for_status(redis, "bots", {"initializing"})
    weights = {"dense": np.zeros((4, 3)).tolist(), "bias": [0.0, 0.0, 0.0]}
    first = await http.post("/sync_model", json={"client_id": "bot-1", "training_id": "bots", "weights": weights,
                                                 "metrics": {"num_examples": 20}})
    assert first.status_code == 202 and first.json()["update"] == "initial_model"
    state = await wait_for_status(redis, "bots", {"running", "paused"})
    assert state.layer_spec == {"dense": ((4, 3), "float32"), "bias": ((3,), "float32")}
    odd = await http.post("/sync_model", json={"client_id": "bot-2", "training_id": "bots",
                                               "weights": {"dense": np.zeros((4, 2)).tolist(), "bias": [0.0, 0.0]},
                                               "metrics": {"num_examples": 20}})
    assert odd.status_code == 422
    assert "layer 'dense'" in odd.json()["detail"] and "(4, 3)" in odd.json()["detail"]
    status = (await http.get("/api/training/bots/status")).json()
    [refusal] = status["model_refusals"]
    assert refusal["agent_id"] == "http-bot-2" and refusal["source"] == "sync"
    assert "layer 'dense': expected (4, 3) float32, received (4, 2) float32" in refusal["detail"]


async def test_server_side_validation_is_refused_at_start_for_a_user_model(
        system: System, http: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    await system.start("coordinator")
    await http.post("/api/training/start", json={
        **training_body({"from_first_agent": True}, validation_data="validation.npz"), "training_id": "noval"})
    state = await wait_for_status(redis, "noval", {"failed"})
    assert "cannot run the training's own model" in state.reason


async def test_agents_without_a_model_of_their_own_are_asked_once_each_not_in_a_loop(
        system: System, http: httpx.AsyncClient, redis: aioredis.Redis, make_agents: Any) -> None:
    await system.start("coordinator", "versions")
    await make_agents(2)  # built-in agents: they hold the dataset but no model of their own
    await http.post("/api/training/start", json={**training_body({"from_first_agent": True}, round_deadline_s=600),
                                                 "training_id": "nomodel"})
    refusals: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + 30
    while len(refusals) < 2 and asyncio.get_running_loop().time() < deadline:
        refusals = (await http.get("/api/training/nomodel/status")).json().get("model_refusals", [])
        await asyncio.sleep(0.05)
    assert {r["reason"] for r in refusals} == {"no_trainer"} and len(refusals) == 2
    # Both were asked once; the next try waits for the round deadline (600 s here).
    await system.stop("coordinator")
    events = [json.loads(fields[b"m"]) for _id, fields in await redis.xrange(KEYS.event_stream)]
    asked = [e for e in events if e["kind"] == "parameters_requested"]
    assert len(asked) == 2 and {e["agent_id"] for e in asked} == {"agent-000", "agent-001"}
    status = (await http.get("/api/training/nomodel/status")).json()
    assert status["status"] == "initializing" and status["attempt"] == 2


async def test_a_model_without_float_values_is_not_a_model(http: httpx.AsyncClient) -> None:
    empty = encode_layers({"w": np.zeros(0, np.float32), "n": np.array(3, np.int64)})
    response = await http.post("/api/models", content=empty, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 422 and "no float values" in response.json()["detail"]
    truncated = encode_layers({"w": np.ones(16, np.float32)})[:-8]
    response = await http.post("/api/models", content=truncated, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 422 and "bad_blob" in response.json()["detail"]
