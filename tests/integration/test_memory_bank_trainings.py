"""Memory-bank trainings through the whole pipeline: agents upload local coresets of their
features (different sizes each), the aggregator merges them into a global bank, the privacy
manager passes it, the version manager commits it like any model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
from numpy.typing import NDArray

from agents.app import Config
from agents.client import FederatedClient
from federated_learning.bus.blobs import RedisBlobStore
from federated_learning.dashboard.main import create_app
from federated_learning.memory_bank import coverage_radius
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.tensors import decode_layers
from federated_learning.services.runtime import ServiceContext
from tests.integration.conftest import TEST_API_KEY, System, wait_for_status

KEYS = Keys()
WIDTH = 16


class Features:
    """A feature extractor over ``rows`` points around this agent's own cluster centres."""

    def __init__(self, seed: int, rows: int, *, width: int = WIDTH) -> None:
        rng = np.random.default_rng(seed)
        centres = rng.normal(0.0, 5.0, (4, width))
        self.features = (centres[rng.integers(0, 4, rows)] + rng.normal(0.0, 0.3, (rows, width))).astype(np.float32)
        self.num_examples = rows // 4
        self.configs: list[Config] = []

    def extract_features(self, config: Config) -> tuple[NDArray[np.float32], int]:
        self.configs.append(dict(config))
        return self.features, self.num_examples


class FailingExtractor(Features):
    """A feature extractor whose own code raises: the agent reports it instead of going silent."""

    def extract_features(self, config: Config) -> tuple[NDArray[np.float32], int]:
        raise RuntimeError("camera offline")


class NotAnExtractor:
    """A model trainer (no extract_features): it cannot take part in a memory-bank training."""

    num_examples = 10

    def get_parameters(self, config: Config) -> dict[str, NDArray[Any]]:
        return {"w": np.zeros(3, np.float32)}

    def fit(self, parameters: Any, config: Config) -> Any:
        return parameters, 10, {}

    def evaluate(self, parameters: Any, config: Config) -> Any:
        return 0.0, 10, {}


@pytest.fixture
async def http(redis: aioredis.Redis, settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    ctx = ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://test",
                                 headers={"X-API-Key": TEST_API_KEY}) as client:
        yield client


@pytest.fixture
async def bank_agents(redis_url: str, settings: Any) -> AsyncIterator[Any]:
    started: list[FederatedClient] = []

    async def make(apps: list[Any]) -> list[FederatedClient]:
        agents = [FederatedClient(f"bank-{len(started) + i:03d}", redis_url=redis_url,
                                  heartbeat_interval_s=settings.heartbeat_interval_s, trainer=app,
                                  dataset="patches", num_examples=app.num_examples)
                  for i, app in enumerate(apps)]
        await asyncio.gather(*(agent.initialize() for agent in agents))
        started.extend(agents)
        return agents

    yield make
    await asyncio.gather(*(agent.close() for agent in started), return_exceptions=True)


def bank_body(training_id: str, **model: Any) -> dict[str, Any]:
    return {"training_id": training_id, "dataset": "patches", "rounds": 2, "clients_per_round": 3,
            "min_clients": 3, "model": {"kind": "memory_bank", "feature_dim": WIDTH, "global_bank_size": 60,
                                        "local_coreset_fraction": 0.5, "max_rows_per_agent": 100, **model}}


async def version_layers(redis: aioredis.Redis, digest: str) -> dict[str, NDArray[Any]]:
    return decode_layers(await RedisBlobStore(redis, KEYS, max_bytes=1 << 24).get(digest), max_bytes=1 << 24)


async def test_banks_of_different_sizes_merge_into_versions_of_the_global_bank(
        system: System, http: httpx.AsyncClient, redis: aioredis.Redis, bank_agents: Any) -> None:
    await system.start()
    apps = [Features(seed, rows) for seed, rows in ((1, 40), (2, 120), (3, 400))]
    await bank_agents(apps)
    started = await http.post("/api/training/start", json=bank_body("banks"))
    assert started.status_code == 202, started.text
    state = await wait_for_status(redis, "banks", {"completed", "failed"}, timeout_s=90)
    assert state.status.value == "completed", state.reason
    assert state.config.algorithm == "memory_bank" and state.privacy_level == "none"
    versions = (await http.get("/api/training/banks/versions")).json()
    assert [v["version"] for v in versions] == [0, 1, 2]
    first = await version_layers(redis, versions[1]["model_digest"])
    # round 1: local coresets of 20, 60 and 100 rows (half of each, at most 100) merged to 60
    assert first["bank"].shape == (60, WIDTH) and first["bank"].dtype == np.float32
    assert int(first["examples"]) == 10 + 30 + 100
    assert state.current_digest is not None
    final = await version_layers(redis, state.current_digest)
    assert final["bank"].shape == (60, WIDTH) and int(final["examples"]) == 2 * 140
    union = np.concatenate([app.features for app in apps])
    # every agent's clusters are covered: no uploaded row is far from the bank (clusters are ~1 wide)
    assert coverage_radius(union, final["bank"]) < 3.0
    assert apps[0].configs[0]["feature_dim"] == WIDTH and apps[0].configs[0]["server_round"] == 1
    status = (await http.get("/api/training/banks/status")).json()
    assert status["layers"][0]["name"] == "bank"
    downloaded = await http.get(f"/api/training/banks/versions/{versions[-1]['version']}/model")
    assert downloaded.status_code == 200
    assert decode_layers(downloaded.content, max_bytes=1 << 24)["bank"].shape == (60, WIDTH)


async def test_an_agent_without_a_feature_extractor_or_of_another_width_is_refused_with_the_reason(
        system: System, http: httpx.AsyncClient, redis: aioredis.Redis, bank_agents: Any) -> None:
    await system.start()
    await bank_agents([Features(1, 50), Features(2, 50), Features(3, 50),
                       Features(4, 50, width=WIDTH + 1), NotAnExtractor(), FailingExtractor(5, 50)])
    body = {**bank_body("odd"), "rounds": 1, "clients_per_round": 6}
    assert (await http.post("/api/training/start", json=body)).status_code == 202
    state = await wait_for_status(redis, "odd", {"completed", "failed"}, timeout_s=90)
    assert state.status.value == "completed", state.reason
    refusals = {r["agent_id"]: r for r in (await http.get("/api/training/odd/status")).json()["model_refusals"]}
    assert set(refusals) == {"bank-003", "bank-004", "bank-005"}
    assert refusals["bank-003"]["reason"] == "bad_shape"
    assert f"rows x {WIDTH}" in refusals["bank-003"]["detail"]
    assert refusals["bank-004"]["reason"] == "not_a_memory_bank"
    assert refusals["bank-005"]["reason"] == "app_failed"
    assert "RuntimeError: camera offline" in refusals["bank-005"]["detail"]
    events = [json.loads(fields[b"m"]) for _id, fields in await redis.xrange(KEYS.event_stream)]
    assert any(e["kind"] == "model_refused" and e["agent_id"] == "bank-004" for e in events)


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"algorithm": "krum"}, "algorithm 'krum' weighs model updates"),
    ({"privacy_level": "medium"}, "differential privacy is calibrated for clipped weight updates"),
    ({"secure_aggregation": True}, "secure aggregation reveals only a sum"),
    ({"rollback": {}}, "a memory bank has none"),
    ({"local": {"compression": "q8"}}, "compression applies to weight updates"),
])
async def test_what_does_not_apply_to_banks_is_refused_at_start_with_the_reason(
        http: httpx.AsyncClient, overrides: dict[str, Any], reason: str) -> None:
    response = await http.post("/api/training/start", json={**bank_body("refused"), **overrides})
    assert response.status_code == 422
    assert reason in response.json()["detail"]


async def test_bank_bounds_are_refused_at_start(http: httpx.AsyncClient) -> None:
    too_wide = await http.post("/api/training/start", json=bank_body("wide", feature_dim=100_000))
    assert too_wide.status_code == 422 and "feature_dim" in too_wide.json()["detail"]
    too_big = await http.post("/api/training/start", json=bank_body("big", feature_dim=4096,
                                                                     global_bank_size=1_000_000))
    assert too_big.status_code == 422 and "global_bank_size x feature_dim" in too_big.json()["detail"]
