"""``promtool check config`` on the shipped scrape config and on what the launcher writes.

Needs Prometheus's ``promtool`` on PATH (Debian: ``apt-get install prometheus``); skipped without it.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from federated_learning.config import Settings
from federated_learning.deploy.launcher import prometheus_config
from tests.e2e.conftest import ROOT, Deployment

PROMTOOL = shutil.which("promtool")
METRICS_PORT_SPAN = 32
"""Ports above the base that services and aggregator workers may export on."""

pytestmark = pytest.mark.skipif(PROMTOOL is None,
                                reason="needs promtool on PATH (Debian: apt-get install prometheus)")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_base() -> int:
    """A metrics port base whose whole span is free right now."""
    for _ in range(50):
        base = random.randrange(20_000, 60_000)
        if all(port_is_free(base + offset) for offset in range(METRICS_PORT_SPAN)):
            return base
    raise AssertionError(f"no free span of {METRICS_PORT_SPAN} ports found")


@pytest.fixture
def deployment_with_metrics_ports(tmp_path: Path) -> Iterator[Deployment]:
    """A deployment with fixed metrics ports: only then does the launcher write a scrape config."""
    deployed = Deployment(tmp_path / "data")
    deployed.env["FL_METRICS_PORT_BASE"] = str(free_port_base())
    deployed.data_dir.mkdir(parents=True)
    deployed.start()
    yield deployed
    deployed.stop()


def promtool_check(path: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)


def assert_valid(path: Path) -> None:
    result = promtool_check(path)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("scrape_configs:\n  - job_name: x\n    static_configs: [{targets: 5}]\n")

    assert promtool_check(broken).returncode != 0


def test_shipped_prometheus_config_is_valid() -> None:
    assert_valid(ROOT / "deploy" / "prometheus.yml")


@pytest.mark.parametrize("tls", [False, True], ids=["http-dashboard", "https-dashboard"])
def test_launcher_prometheus_config_is_valid_for_fixed_ports(tmp_path: Path, tls: bool) -> None:
    pem = tmp_path / "dashboard.pem"
    pem.write_text("not read by promtool check config, only named\n")
    settings = Settings(metrics_port_base=9200, aggregator_workers=3)
    if tls:
        settings = settings.model_copy(update={"dashboard_tls_cert_file": pem, "dashboard_tls_key_file": pem,
                                               "dashboard_tls_ca_file": pem})
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config(settings))

    assert ("scheme: https" in config.read_text()) is tls
    assert_valid(config)


def test_config_the_deployed_launcher_writes_is_valid(deployment_with_metrics_ports: Deployment) -> None:
    deployed = deployment_with_metrics_ports
    written = deployed.data_dir / "run" / "prometheus.yml"
    coordinator_port = deployed.health()["services"]["coordinator"][0]["metrics_port"]

    assert f'"127.0.0.1:{coordinator_port}"' in written.read_text()
    assert_valid(written)
