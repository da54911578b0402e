"""``/sync_model`` refuses what the coordinator would drop or misread, with the reason: weights
that are not numbers, metrics it does not know, an update trained from a version it no longer
takes. Nothing is submitted for them, and the training goes on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from federated_learning.dashboard.main import create_app
from federated_learning.protocol.keys import Keys
from federated_learning.services.runtime import ServiceContext
from tests.integration.conftest import (
    TEST_API_KEY,
    System,
    digits_config,
    start_training,
    wait_for_status,
)

KEYS = Keys()


@pytest.fixture
async def http(redis: aioredis.Redis, settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    ctx = ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://gw",
                                 headers={"X-API-Key": TEST_API_KEY}) as client:
        yield client


def good_body() -> dict[str, Any]:
    return {"client_id": "bot", "training_id": "sync",
            "weights": {"dense.weight": np.zeros((64, 10)).tolist(), "dense.bias": [0.0] * 10},
            "metrics": {"num_examples": 12}}


@pytest.mark.parametrize(("change", "status", "words"), [
    ({"weights": {"dense.weight": np.zeros((64, 10)).astype(str).tolist(), "dense.bias": [0.0] * 10}},
     422, "holds"),
    ({"weights": {"dense.weight": np.zeros((64, 10), bool).tolist(), "dense.bias": [0.0] * 10}}, 422, "bool"),
    ({"weights": {"dense.weight": [[0.0] * 10] * 63 + [[0.0] * 9], "dense.bias": [0.0] * 10}}, 422, "inhomogeneous"),
    ({"weights": {"dense.weight": [[None] * 10] * 64, "dense.bias": [0.0] * 10}}, 422, "nulls"),
    ({"metrics": {"num_examples": 12, "secret_weight": 1e9}}, 422, "secret_weight"),
    ({"metrics": {"num_examples": 12, "accuracy": True}}, 422, "accuracy"),
    ({"base_version": 10**12}, 409, "not a recent version"),
])
async def test_a_sync_the_coordinator_would_drop_is_refused_with_the_reason(
        redis: aioredis.Redis, system: System, make_agents: Any, http: httpx.AsyncClient,
        change: dict[str, Any], status: int, words: str) -> None:
    await system.start()
    await make_agents(3)
    await start_training(redis, "sync", digits_config(rounds=50))
    await wait_for_status(redis, "sync", {"running"})
    response = await http.post("/sync_model", json={**good_body(), **change})
    assert response.status_code == status, response.text
    assert words in response.text
    assert await redis.hget(KEYS.agents, "http-bot") is None  # nothing was registered or submitted
    assert (await http.post("/sync_model", json=good_body())).status_code == 200


async def test_the_json_form_is_bounded_by_its_count_of_values(redis: aioredis.Redis, system: System,
                                                                http: httpx.AsyncClient) -> None:
    await system.start()
    await start_training(redis, "sync", digits_config(rounds=50))
    await wait_for_status(redis, "sync", {"running", "paused"})
    # Counted before parsing: a million separators in 1 MB (within max_blob_bytes) are refused unparsed.
    many = b'{"client_id": "bot", "weights": {"w": [' + b"," * 1_000_000 + b']}}'
    response = await http.post("/sync_model", content=many, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "safetensors" in response.json()["detail"]
