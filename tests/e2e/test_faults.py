"""Faults: kill -9 of a service mid-round, and a restart of the whole deployment.

After each, the training completes every round, version numbers have no gaps, and
each version was aggregated from exactly the updates the coordinator accepted for
its round (none lost, none counted twice).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
import redis.asyncio as aioredis

from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import VersionRecord
from tests.e2e.conftest import Deployment, training_body, wait_status

ROUNDS = 8


async def wait_phase(http: httpx.AsyncClient, training_id: str, phase: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (await http.get(f"/api/training/{training_id}/status")).json()["phase"] == phase:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"training {training_id} never reached phase {phase}")


async def assert_every_round_committed_once(deployment: Deployment, training_id: str) -> None:
    keys = Keys()
    client = aioredis.Redis.from_url(deployment.redis_url)
    try:
        records = sorted((VersionRecord.model_validate_json(v)
                          for v in (await client.hgetall(keys.versions(training_id))).values()),
                         key=lambda r: r.version)
        assert [r.version for r in records] == list(range(ROUNDS + 1))
        assert [r.round for r in records] == list(range(ROUNDS + 1))
        for record in records[1:]:
            accepted = sorted(k.decode() for k in await client.hkeys(keys.round_updates(training_id, record.round)))
            assert record.contributors == accepted, f"round {record.round}"
    finally:
        await client.aclose()


@pytest.mark.parametrize("service", ["coordinator", "aggregator", "versions"])
async def test_killed_service_is_restarted_and_the_training_completes(deployment: Deployment, agents, service: str) -> None:
    async with deployment.client() as http:
        training_id = (await http.post("/api/training/start", json=training_body(ROUNDS))).json()["training_id"]
        await wait_status(http, training_id, {"running"}, min_round=2)
        victim = deployment.pid_of(service)
        if service != "coordinator":
            # Frozen, it still receives its next message (the server delivers it into the
            # worker's pending list); killed then, it dies holding that message unhandled.
            os.kill(victim, signal.SIGSTOP)
            await wait_phase(http, training_id, "aggregating")
            await asyncio.sleep(0.5)
        os.kill(victim, signal.SIGKILL)

        status = await wait_status(http, training_id, {"completed", "failed"}, timeout_s=180)

        assert status["status"] == "completed", status["reason"]
        assert deployment.pid_of(service) != victim
    await assert_every_round_committed_once(deployment, training_id)


async def test_restarted_deployment_resumes_the_training(deployment: Deployment, agents) -> None:
    async with deployment.client() as http:
        training_id = (await http.post("/api/training/start", json=training_body(ROUNDS))).json()["training_id"]
        before = await wait_status(http, training_id, {"running"}, min_round=3)
    deployment.stop()
    deployment.start()
    async with deployment.client() as http:
        resumed = (await http.get(f"/api/training/{training_id}/status")).json()
        assert resumed["current_version"] >= before["current_version"]
        status = await wait_status(http, training_id, {"completed", "failed"}, timeout_s=180)
    assert status["status"] == "completed", status["reason"]
    await assert_every_round_committed_once(deployment, training_id)
