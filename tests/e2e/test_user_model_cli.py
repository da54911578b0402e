"""The user's path through a deployed system, with the commands a user types: the model file is
uploaded and trained with ``python -m federated_learning.rest_client start --initial-model``, and
the agents run the user's code with ``python -m agents run --app``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from federated_learning.protocol.tensors import decode_layers
from tests.e2e.conftest import ROOT, Deployment

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(240)
def test_a_model_file_trains_with_the_cli_and_agents_run_by_the_runner(deployment: Deployment, tmp_path: Path) -> None:
    model_file = tmp_path / "model.safetensors"
    save_file({"dense.weight": np.zeros((64, 10), np.float32), "dense.bias": np.zeros(10, np.float64),
               "steps": np.array(0, np.int64)}, str(model_file))
    body = tmp_path / "training.json"
    body.write_text(json.dumps({"clients_per_round": 3, "min_clients": 3, "privacy_level": "none",
                                "local": {"epochs": 5}}))
    agents = subprocess.Popen(
        [sys.executable, "-m", "agents", "run", "--app", "tests.e2e.user_app:make", "--agent-id", "cli",
         "--agents", "3", "--redis-url", deployment.redis_url, "--dataset", "digits", "--heartbeat-s", "0.5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        started = subprocess.run(
            [sys.executable, "-m", "federated_learning.rest_client", "--url", deployment.dashboard_url,
             f"--api-key={deployment.api_key}", "start", "--initial-model", str(model_file), "--config", str(body),
             "--dataset", "digits", "--rounds", "2", "--wait"],
            cwd=ROOT, capture_output=True, text=True, timeout=200, check=False)
    finally:
        agents.terminate()
        agent_log = agents.communicate(timeout=30)[0].decode()
    assert started.returncode == 0, started.stderr + agent_log[-3000:] + deployment.log_tail()
    training_id, _, final_json = started.stdout.partition("\n")
    final = json.loads(final_json)
    assert final["status"] == "completed", (final["reason"], final["model_refusals"])
    # A file saved by safetensors.numpy lists its tensors in its own order; names match the agents'.
    assert sorted(final["layers"], key=lambda layer: layer["name"]) == [
        {"name": "dense.bias", "shape": [10], "dtype": "float64"},
        {"name": "dense.weight", "shape": [64, 10], "dtype": "float32"},
        {"name": "steps", "shape": [], "dtype": "int64"}]
    model = httpx.get(f"{deployment.dashboard_url}/api/training/{training_id}/versions/"
                      f"{final['current_version']}/model", headers={"X-API-Key": deployment.api_key}).content
    layers = decode_layers(model, max_bytes=1 << 24)
    assert int(layers["steps"]) == 10  # two rounds of five local steps, carried as the maximum
    assert "3 agent(s) joined" in agent_log


def run_agents(deployment: Deployment, factory: str, agent_id: str, count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agents", "run", "--app", f"tests.e2e.user_app:{factory}", "--agent-id", agent_id,
         "--agents", str(count), "--redis-url", deployment.redis_url, "--dataset", "digits", "--heartbeat-s", "0.5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(deployment: Deployment, training_id: str, done: Callable[[dict[str, Any]], bool],
             timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(f"{deployment.dashboard_url}/api/training/{training_id}/status",
                             headers={"X-API-Key": deployment.api_key})
        if response.status_code == 200:
            status = response.json()
            if done(status):
                return status
        time.sleep(0.1)
    raise AssertionError(f"{training_id}: {json.dumps(status)[:1500]}\n{deployment.log_tail()}")


@pytest.mark.timeout(240)
def test_the_first_agent_s_half_precision_model_trains_and_another_layout_is_refused_over_rest(
        deployment: Deployment) -> None:
    started = subprocess.run(
        [sys.executable, "-m", "federated_learning.rest_client", "--url", deployment.dashboard_url,
         f"--api-key={deployment.api_key}", "start", "--from-first-agent", "--dataset", "digits", "--rounds", "1000",
         "--training-id", "half"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert started.returncode == 0, started.stderr
    half = run_agents(deployment, "make_half", "half", 3)
    narrow: subprocess.Popen[bytes] | None = None
    try:
        fixed = wait_for(deployment, "half", lambda s: bool(s["layers"]))
        assert {layer["name"]: layer["dtype"] for layer in fixed["layers"]} == {
            "dense.weight": "float16", "dense.bias": "bfloat16", "steps": "int64"}
        narrow = run_agents(deployment, "make_narrow", "narrow", 1)
        # Rounds go on (1000 of them) until the odd agent has been asked and refused; then stop.
        wait_for(deployment, "half", lambda s: bool(s["model_refusals"]) or s["status"] != "running", timeout_s=180)
        httpx.post(f"{deployment.dashboard_url}/api/training/half/stop", headers={"X-API-Key": deployment.api_key})
        final = wait_for(deployment, "half", lambda s: s["status"] in ("completed", "failed", "stopped"))
    finally:
        logs = []
        for process in (half, narrow):
            if process is not None:
                process.terminate()
                logs.append(process.communicate(timeout=30)[0].decode()[-3000:])
    assert final["status"] == "stopped" and final["current_version"] >= 1, (final["reason"], logs)
    assert len(final["model_refusals"]) == 1, logs
    [refusal] = final["model_refusals"]
    assert refusal["agent_id"] == "narrow" and refusal["source"] == "agent"
    assert "layer 'dense.weight': expected (64, 10) float16, received (32, 10) float32" in refusal["detail"]
    model = decode_layers(httpx.get(f"{deployment.dashboard_url}/api/training/half/versions/"
                                    f"{final['current_version']}/model",
                                    headers={"X-API-Key": deployment.api_key}).content, max_bytes=1 << 24)
    assert model["dense.weight"].dtype == np.float16 and model["dense.bias"].dtype.name == "bfloat16"
    alerts = httpx.get(f"{deployment.dashboard_url}/api/alerts", headers={"X-API-Key": deployment.api_key}).json()
    assert any(alert["rule"] == "model_refused" and "narrow" in alert["message"] for alert in alerts)
