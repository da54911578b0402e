"""Faults of the embedded Valkey: kill -9 of the server mid-training under central DP.

While the server is down (the launcher frozen, so that it cannot restart it yet), the health
endpoint answers at once: 503, ``critical``, ``bus unreachable``. Thawed, the launcher restarts
the server on the same port from its append-only file; services and agents reconnect, and the
training completes with versions 0..N, one per round, each hashing (SHA-256, on disk, on the bus
and over REST) to its recorded digest, and a privacy ledger that holds exactly N releases.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agents.client import FederatedClient
from federated_learning.privacy.accountant import (
    GaussianEvent,
    PrivacyAccountant,
    compute_noise_multiplier,
)
from federated_learning.privacy.levels import PrivacyLevel, privacy_targets
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import VersionRecord
from tests.e2e.conftest import Deployment, training_body, wait_status

pytestmark = pytest.mark.e2e

ROUNDS = 4
PRIVACY_LEVEL = "medium"
HEALTH_ANSWER_S = 5.0
"""The health endpoint must answer within this while the bus is down (it waits 2 s for it)."""
RESTART_TIMEOUT_S = 30.0
VALKEY_BINARY = "valkey-server"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def valkey_of(deployment: Deployment) -> psutil.Process:
    """The launcher's valkey-server child."""
    assert deployment.process is not None
    [server] = [child for child in psutil.Process(deployment.process.pid).children()
                if child.name() == VALKEY_BINARY]
    return server


async def wait_dead(process: psutil.Process, timeout_s: float = 10.0) -> None:
    """Until ``process`` is gone or a zombie (its frozen parent cannot reap it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"pid {process.pid} still running {timeout_s:.0f}s after SIGKILL")


async def wait_for_new_valkey(deployment: Deployment, old_pid: int) -> psutil.Process:
    """The valkey-server the launcher started after ``old_pid`` died, once it answers PING."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            server = valkey_of(deployment)
        except ValueError:  # none yet (not enough values to unpack)
            server = None
        if server is not None and server.pid != old_pid:
            client = aioredis.Redis.from_url(deployment.redis_url, socket_connect_timeout=0.5)
            try:
                if await client.ping():
                    return server
            except (OSError, RedisError):
                pass
            finally:
                await client.aclose()
        await asyncio.sleep(0.05)
    raise AssertionError(f"valkey-server not restarted within {RESTART_TIMEOUT_S:.0f}s\n{deployment.log_tail()}")


async def health_while_the_bus_is_down(deployment: Deployment) -> tuple[float, httpx.Response]:
    began = time.monotonic()
    async with httpx.AsyncClient(timeout=HEALTH_ANSWER_S + 5) as http:
        response = await http.get(f"{deployment.dashboard_url}/api/system/health")
    return time.monotonic() - began, response


async def assert_versions_hash_to_their_digests(deployment: Deployment, http: httpx.AsyncClient,
                                                redis: aioredis.Redis, keys: Keys, training_id: str) -> None:
    records = sorted((VersionRecord.model_validate_json(raw)
                      for raw in (await redis.hgetall(keys.versions(training_id))).values()),
                     key=lambda r: r.version)
    assert [r.version for r in records] == list(range(ROUNDS + 1))
    assert [r.round for r in records] == list(range(ROUNDS + 1))
    listed = (await http.get(f"/api/training/{training_id}/versions")).json()
    assert [(v["version"], v["model_digest"]) for v in listed] == [(r.version, r.model_digest) for r in records]
    for record in records:
        assert sha256(Path(record.checkpoint).read_bytes()) == record.model_digest, f"checkpoint {record.version}"
        served = await http.get(f"/api/training/{training_id}/versions/{record.version}/model")
        assert served.status_code == 200, served.text
        assert sha256(served.content) == record.model_digest, f"served model of version {record.version}"
        blob = await redis.get(keys.blob(record.model_digest))
        assert blob is None or (isinstance(blob, bytes) and sha256(blob) == record.model_digest), \
            f"bus blob of version {record.version}"


async def assert_one_charge_per_round(http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys,
                                      training_id: str) -> None:
    """The ledger holds exactly ROUNDS releases and as much epsilon as ROUNDS releases charged directly."""
    targets = privacy_targets(PrivacyLevel(PRIVACY_LEVEL))
    noise_multiplier = compute_noise_multiplier(targets.epsilon, targets.delta, 1.0, ROUNDS)
    raw = await redis.get(keys.privacy_budget(training_id))
    assert raw is not None
    ledger = PrivacyAccountant.from_dict(json.loads(raw))
    assert ledger.events == (GaussianEvent(noise_multiplier, 1.0, ROUNDS),)
    direct = PrivacyAccountant(targets.epsilon, targets.delta)
    expected = direct.step(noise_multiplier, 1.0, ROUNDS)
    budget = (await http.get(f"/api/training/{training_id}/privacy")).json()
    assert budget["epsilon_spent"] == pytest.approx(expected, rel=1e-12)
    assert [r["round"] for r in budget["per_round"]] == list(range(1, ROUNDS + 1))


async def test_a_killed_valkey_is_restarted_from_its_append_only_file_and_the_training_completes(
        deployment: Deployment, agents: list[FederatedClient]) -> None:
    assert deployment.process is not None
    launcher = deployment.process.pid
    keys = Keys()
    async with deployment.client() as http:
        started = await http.post("/api/training/start",
                                  json=training_body(ROUNDS, privacy_level=PRIVACY_LEVEL))
        assert started.status_code == 202, started.text
        training_id = started.json()["training_id"]
        before = await wait_status(http, training_id, {"running"}, min_round=2)
        victim = valkey_of(deployment)

        os.kill(launcher, signal.SIGSTOP)  # no restart until the health check below has answered
        try:
            victim.kill()
            await wait_dead(victim)
            took_s, health = await health_while_the_bus_is_down(deployment)
        finally:
            os.kill(launcher, signal.SIGCONT)

        assert took_s < HEALTH_ANSWER_S
        assert health.status_code == 503
        assert health.json()["health_status"] == "critical"
        assert health.json()["reasons"][0].startswith("bus unreachable")
        restarted = await wait_for_new_valkey(deployment, victim.pid)
        assert restarted.pid != victim.pid
        status = await wait_status(http, training_id, {"completed", "failed"}, timeout_s=120)
        assert status["status"] == "completed", status["reason"]
        assert before["current_version"] < ROUNDS

        redis = aioredis.Redis.from_url(deployment.redis_url)
        try:
            await assert_versions_hash_to_their_digests(deployment, http, redis, keys, training_id)
            await assert_one_charge_per_round(http, redis, keys, training_id)
        finally:
            await redis.aclose()
    assert "valkey exited with -9" in (deployment.data_dir.parent / "deploy.log").read_text()
