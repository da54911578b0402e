"""A memory-bank training through a deployed system: agents run by ``python -m agents run`` with
banks of different sizes, started with the CLI; one agent is killed in the middle of its task
and the training completes without it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from federated_learning.protocol.tensors import decode_layers
from tests.e2e.bank_app import WIDTH
from tests.e2e.conftest import ROOT, Deployment

pytestmark = pytest.mark.e2e


def run_agents(deployment: Deployment, factory: str, agent_id: str, count: int,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agents", "run", "--app", f"tests.e2e.bank_app:{factory}", "--agent-id", agent_id,
         "--agents", str(count), "--redis-url", deployment.redis_url, "--dataset", "patches",
         "--heartbeat-s", "0.5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the stalling agent never took its task"
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_banks_of_different_sizes_merge_while_an_agent_killed_mid_task_is_left_behind(
        deployment: Deployment, tmp_path: Path) -> None:
    marker = tmp_path / "stalled"
    honest = run_agents(deployment, "make", "bank", 3)
    stalling = run_agents(deployment, "make_stalling", "stall", 1, env={"FL_TEST_STALL_MARKER": str(marker)})
    try:
        started = subprocess.run(
            [sys.executable, "-m", "federated_learning.rest_client", "--url", deployment.dashboard_url,
             f"--api-key={deployment.api_key}", "start", "--memory-bank-dim", str(WIDTH), "--bank-size", "150",
             "--local-coreset-fraction", "0.5", "--dataset", "patches", "--rounds", "2", "--training-id", "bank",
             "--config", str(write_body(tmp_path))],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert started.returncode == 0, started.stderr
        wait_for_file(marker, stalling)
        stalling.send_signal(signal.SIGKILL)
        final = wait_final(deployment, "bank")
    finally:
        logs = []
        for process in (honest, stalling):
            if process.poll() is None:
                process.terminate()
            logs.append(process.communicate(timeout=30)[0].decode()[-3000:])
    assert final["status"] == "completed", (final["reason"], logs, deployment.log_tail())
    assert final["current_version"] == 2
    headers = {"X-API-Key": deployment.api_key}
    model = decode_layers(httpx.get(f"{deployment.dashboard_url}/api/training/bank/versions/2/model",
                                    headers=headers).content, max_bytes=1 << 24)
    # local coresets of 50, 100 and 150 rows; the global bank keeps 150
    assert model["bank"].shape == (150, WIDTH) and model["bank"].dtype == np.float32
    assert int(model["examples"]) == 2 * (100 + 200 + 300)
    metrics = httpx.get(f"{deployment.dashboard_url}/api/training/bank/metrics", headers=headers).json()
    assert [m["participants"] for m in metrics] == [3, 3]


def write_body(folder: Path) -> Path:
    body = folder / "training.json"
    body.write_text('{"clients_per_round": 4, "min_clients": 3, "round_deadline_s": 10}')
    return body


def wait_final(deployment: Deployment, training_id: str, timeout_s: float = 200.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        response = httpx.get(f"{deployment.dashboard_url}/api/training/{training_id}/status",
                             headers={"X-API-Key": deployment.api_key})
        if response.status_code == 200:
            status = response.json()
            if status["status"] in ("completed", "failed", "stopped"):
                return status
        time.sleep(0.1)
    raise AssertionError(f"{training_id}: {status}\n{deployment.log_tail()}")
