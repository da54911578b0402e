"""The deployed system: the launcher as a real process tree, agents in the test's event loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agents.client import FederatedClient
from agents.data import make_client_datasets
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0


class Deployment:
    """``scripts/deploy-federated-learning.py`` in a fresh data folder on free ports."""

    def __init__(self, data_dir: Path, *, own_process_group: bool = False, blob_dir: Path | None = None) -> None:
        """``own_process_group``: the launcher leads a process group of its own, as under
        systemd or a container runtime, so a test can signal the group (``os.killpg``).
        ``blob_dir``: models and uploads as files there (decision 0014), else in Redis."""
        self.data_dir = data_dir
        self.own_process_group = own_process_group
        self.dashboard_port = free_port()
        self.redis_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "FL_DATA_DIR": str(data_dir), "FL_DASHBOARD_PORT": str(self.dashboard_port),
            "FL_REDIS_EMBEDDED_PORT": str(self.redis_port), "FL_METRICS_PORT_BASE": "0",
            "FL_HEARTBEAT_INTERVAL_S": "0.5", "FL_HEARTBEAT_TIMEOUT_S": "4",
            "FL_ROUND_DEADLINE_S": "20", "FL_CLAIM_IDLE_MS": "2000", "FL_CPU_CORES": "2",
            "FL_MIN_CLIENTS_PER_ROUND": "2", "FL_MAX_CLIENTS_PER_ROUND": "10",
            "FL_DEFAULT_PRIVACY_LEVEL": "none", "FL_REDIS_URL": "",
            "FL_BLOB_DIR": str(blob_dir or ""),
        }

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def redis_url(self) -> str:
        """With the password the launcher generated (the deployment file is mode 0600)."""
        return str(json.loads((self.data_dir / "run" / "deployment.json").read_text())["redis_url"])

    def start(self) -> None:
        with open(self.data_dir.parent / "deploy.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "deploy-federated-learning.py")],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.data_dir.parent,
                start_new_session=self.own_process_group)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the launcher exited\n{self.log_tail()}")
            try:
                if self.health()["health_status"] == "healthy":
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        tail = self.log_tail()
        self.stop()  # the caller never gets a deployment to stop: leave no processes behind
        raise AssertionError(f"deployment not healthy in {START_TIMEOUT_S}s\n{tail}")

    @property
    def api_key(self) -> str:
        return str(json.loads((self.data_dir / "run" / "deployment.json").read_text())["api_key"])

    def client(self) -> httpx.AsyncClient:
        """An HTTP client for the dashboard that sends the deployment's API key."""
        return httpx.AsyncClient(base_url=self.dashboard_url, headers={"X-API-Key": self.api_key})

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.dashboard_url}/api/system/health", timeout=5).json()
        return result

    def pid_of(self, service: str) -> int:
        return int(self.health()["services"][service][0]["pid"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        self.process = None

    def log_tail(self) -> str:
        logs = [self.data_dir.parent / "deploy.log", *sorted((self.data_dir / "logs").glob("*.log"))]
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """Blobs in Redis; ``"folder"`` as the fixture's parameter (``indirect``) keeps them as files."""
    blobs = getattr(request, "param", "redis")
    deployed = Deployment(tmp_path / "data", blob_dir=tmp_path / "blobs" if blobs == "folder" else None)
    deployed.data_dir.mkdir(parents=True)
    deployed.start()
    yield deployed
    deployed.stop()


@pytest.fixture
async def agents(deployment: Deployment) -> AsyncIterator[list[FederatedClient]]:
    clients, _ = make_client_datasets(10, "dirichlet:0.5", 0)
    started = []
    for data in clients:
        agent = FederatedClient(f"agent-{data.client_id:03d}", redis_url=deployment.redis_url,
                                heartbeat_interval_s=0.5)
        agent.add_dataset("digits", data.train.x, data.train.y, x_eval=data.eval.x, y_eval=data.eval.y)
        started.append(agent)
    await asyncio.gather(*(a.initialize() for a in started))
    yield started
    await asyncio.gather(*(a.close() for a in started), return_exceptions=True)


def training_body(rounds: int, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "e2e", "dataset": "digits",
        "model": {"trainer": "softmax", "num_features": 64, "num_classes": 10},
        "rounds": rounds, "clients_per_round": 6, "min_clients": 3,
        "local": {"epochs": 3, "batch_size": 8, "learning_rate": 0.1},
        "privacy_level": "none",
    }
    body.update(overrides)
    return body


async def wait_status(http: httpx.AsyncClient, training_id: str, wanted: set[str],
                      timeout_s: float = 120.0, min_round: int = 0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await http.get(f"/api/training/{training_id}/status")
        if response.status_code == 200:
            status = response.json()
            if status["status"] in wanted and status["round"] >= min_round:
                return status
        await asyncio.sleep(0.02)
    raise AssertionError(f"training {training_id} not {wanted} (round >= {min_round}) after {timeout_s}s: {json.dumps(status)[:500]}")
