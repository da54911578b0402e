"""SIGTERM to the deployment's whole process group (what systemd's control-group kill and
container runtimes send) stops every process within seconds, in order: the dashboard, the
services, the embedded Valkey last, each with a clean exit."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agents.client import FederatedClient
from agents.data import make_client_datasets
from federated_learning.deploy.launcher import VALKEY, stop_tier
from tests.e2e.conftest import Deployment, training_body, wait_status

pytestmark = pytest.mark.e2e

STOP_BOUND_S = 10.0
"""Every process of the deployment is gone this long after the group's SIGTERM."""
STOPPED = re.compile(r"deploy INFO stopped (\S+) in [0-9.]+s \(exit code (-?\d+)\)")
STARTED = re.compile(r"deploy INFO started (\S+) \(pid \d+\)")


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """The launcher leading a process group of its own, as under systemd or a container runtime."""
    deployed = Deployment(tmp_path / "data", own_process_group=True)
    deployed.data_dir.mkdir(parents=True)
    deployed.start()
    yield deployed
    deployed.stop()


def started_children(log: str) -> set[str]:
    return set(STARTED.findall(log))


async def train_briefly(deployment: Deployment) -> None:
    """Agents join and train a round or more, then leave (an operator stops agents first)."""
    clients, _ = make_client_datasets(4, "iid", 0)
    agents = []
    for data in clients:
        agent = FederatedClient(f"agent-{data.client_id:03d}", redis_url=deployment.redis_url,
                                heartbeat_interval_s=0.5)
        agent.add_dataset("digits", data.train.x, data.train.y, x_eval=data.eval.x, y_eval=data.eval.y)
        agents.append(agent)
    await asyncio.gather(*(agent.initialize() for agent in agents))
    try:
        async with deployment.client() as http:
            started = await http.post("/api/training/start",
                                      json=training_body(50, clients_per_round=4, min_clients=3))
            assert started.status_code == 202, started.text
            await wait_status(http, started.json()["training_id"], {"running"}, min_round=2)
    finally:
        await asyncio.gather(*(agent.close() for agent in agents))


async def test_sigterm_to_the_process_group_stops_everything_in_order_within_seconds(
        deployment: Deployment) -> None:
    assert deployment.process is not None
    launcher = psutil.Process(deployment.process.pid)
    await train_briefly(deployment)
    processes = [launcher, *launcher.children(recursive=True)]
    log_path = deployment.data_dir.parent / "deploy.log"
    children = started_children(log_path.read_text())
    assert "valkey-server" in {p.name() for p in processes}
    assert len(processes) == len(children) + 1

    began = time.monotonic()
    os.killpg(os.getpgid(launcher.pid), signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=STOP_BOUND_S)
    took_s = time.monotonic() - began

    assert not alive, f"still running {took_s:.1f}s after SIGTERM: {alive}\n{deployment.log_tail()}"
    assert deployment.process.wait(1) == 0
    log = log_path.read_text()
    stopped = STOPPED.findall(log.split("received SIGTERM", 1)[1])
    names = [name for name, _ in stopped]
    assert sorted(names) == sorted(children)
    assert [stop_tier(name) for name in names] == sorted(stop_tier(name) for name in names), names
    assert names[0] == "dashboard" and names[-1] == VALKEY
    assert all(code == "0" for _, code in stopped), stopped
    assert "did not stop" not in log
    valkey_log = (deployment.data_dir / "redis" / "valkey.log").read_text()
    assert "Calling fsync() on the AOF file" in valkey_log.rsplit("User requested shutdown", 1)[1]
