"""What every example does around the user's code: deploy the system on this machine, start the
user's agents with ``python -m agents run``, follow the training and score the final model.

A real deployment runs ``scripts/deploy-federated-learning.py`` once and starts agents where the
data is; an example does both here so that one command shows the whole path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agents.runner import agent_ids
from federated_learning.config import load_settings
from federated_learning.deploy.launcher import deployment_file
from federated_learning.deploy.local import LocalDeployment, stop_on_sigterm
from federated_learning.rest_client import RestClient
from federated_learning.types import NamedLayers

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FL_EXAMPLES_DATA_DIR", ROOT / "data" / "examples"))


@contextmanager
def deployed(name: str) -> Iterator[tuple[LocalDeployment, RestClient]]:
    """A fresh deployment of every service (data in ``data/examples/<name>``) and a REST client."""
    data_dir = DATA / name
    shutil.rmtree(data_dir, ignore_errors=True)
    os.environ["FL_DATA_DIR"] = str(data_dir)
    settings = load_settings(ROOT / "config.json")
    deployment = LocalDeployment(settings, ROOT / "config.json", data_dir)
    stop_on_sigterm()
    print(f"starting the deployment (logs in {data_dir / 'logs'})", flush=True)
    deployment.start()
    print(f"dashboard: {deployment.dashboard_url} (API key in {deployment_file(data_dir)})", flush=True)
    api = RestClient(deployment.dashboard_url, deployment.api_key, verify=deployment.dashboard_verify)
    try:
        yield deployment, api
    finally:
        api.close()
        deployment.stop()


@contextmanager
def agents(deployment: LocalDeployment, app: str, agent_id: str, count: int, *, dataset: str,
           env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``count`` agents of ``app`` in one process (``python -m agents run --agents N``), each
    logging in to Redis as its own user (provisioned here, as an operator would)."""
    deployment.provision_agents(agent_ids(agent_id, count))
    log = open(deployment.data_dir / f"agents-{agent_id}.log", "ab")  # noqa: SIM115 - closed below
    command = [sys.executable, "-m", "agents", "run", "--app", app, "--agent-id", agent_id,
               "--agents", str(count), "--dataset", dataset,
               "--deployment", str(deployment_file(deployment.data_dir)), "--heartbeat-s", "2"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def follow(api: RestClient, training_id: str, *, timeout_s: float = 600.0,
           on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Print one line per round until the training ends; its final status."""
    seen = 0
    said = ""
    deadline = time.monotonic() + timeout_s
    while True:
        status = api.status(training_id)
        if status is not None:
            rounds = api.metrics(training_id)
            for row in rounds[seen:]:
                (on_round or print_round)(row)
            seen = len(rounds)
            if status["status"] in ("completed", "failed", "stopped"):
                return status
            if status.get("reason") and status["reason"] != said and status["status"] != "failed":
                said = status["reason"]
                print(f"  {status['status']}: {said}", flush=True)
        if time.monotonic() > deadline:
            raise TimeoutError(f"training {training_id} did not end within {timeout_s:.0f}s")
        time.sleep(1.0)


def print_round(row: dict[str, Any]) -> None:
    accuracy = row.get("eval_accuracy")
    shown = "-" if accuracy is None else f"{accuracy:.3f}"
    print(f"round {row['round']:>2}: agents' accuracy of the model sent out {shown}, "
          f"{row['participants']} agents, {row['round_seconds']:.2f}s", flush=True)


def final_model(api: RestClient, training_id: str, status: dict[str, Any], *,
                who_fixed_the_layout: str = "") -> NamedLayers | None:
    """The training's last version (None, after saying why, when it did not complete); prints the
    layout when ``who_fixed_the_layout`` names the first agent or bot."""
    if status["status"] != "completed":
        print(f"training {status['status']}: {status.get('reason')}", flush=True)
        return None
    if who_fixed_the_layout:
        print(f"layout fixed by {who_fixed_the_layout}: " + ", ".join(
            f"{layer['name']} {tuple(layer['shape'])} {layer['dtype']}" for layer in status["layers"]), flush=True)
    return api.download_model(training_id, status["current_version"])


def report_accuracy(accuracy: float, target: float) -> int:
    """The example's last line, and its exit code: 0 when the stated accuracy is reached."""
    print(f"test accuracy: {accuracy:.3f}", flush=True)
    return 0 if accuracy >= target else 1
