"""A bus that does not answer, or refuses the credentials, ends the launcher and
``simulate-clients`` with one line naming the URL and the cause, and exit code 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from federated_learning.bus.embedded import EmbeddedValkey
from federated_learning.config import load_settings
from federated_learning.deploy.launcher import deployment_file
from federated_learning.deploy.local import DeploymentFailed, LocalDeployment
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "scripts" / "deploy-federated-learning.py"
SIMULATE = ROOT / "scripts" / "simulate-clients.py"
RUN_TIMEOUT_S = 120


def launcher_env(data_dir: Path, redis_url: str) -> dict[str, str]:
    return {**os.environ, "FL_DATA_DIR": str(data_dir), "FL_REDIS_URL": redis_url,
            "FL_DASHBOARD_PORT": str(free_port()), "FL_METRICS_PORT_BASE": "0"}


def run_script(script: Path, *args: str, env: dict[str, str] | None = None,
               cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=RUN_TIMEOUT_S, check=False)


def test_the_launcher_stops_with_one_line_when_the_bus_does_not_answer(tmp_path: Path) -> None:
    port = free_port()
    result = run_script(DEPLOY, env=launcher_env(tmp_path, f"redis://fl:s3cret@127.0.0.1:{port}"))

    assert result.returncode == 1, result.stderr
    expected = (f"error: cannot reach the bus at redis://fl:***@127.0.0.1:{port}: Connection refused "
                "(no answer to PING within 5s)")
    assert result.stderr.splitlines() == [expected]
    assert "s3cret" not in result.stdout + result.stderr
    assert not deployment_file(tmp_path).exists()


def test_the_launcher_names_refused_credentials(tmp_path: Path, valkey_server: EmbeddedValkey) -> None:
    port = urlsplit(valkey_server.url).port
    result = run_script(DEPLOY, env=launcher_env(tmp_path, f"redis://nobody:wrong@127.0.0.1:{port}"))

    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: the bus at redis://nobody:***@127.0.0.1:{port} refused the credentials: ")
    assert "wrong" not in line


def test_a_local_deployment_reports_the_launchers_one_line(tmp_path: Path) -> None:
    port = free_port()
    deployment = LocalDeployment(load_settings(None), None, tmp_path,
                                 extra_env=launcher_env(tmp_path, f"redis://127.0.0.1:{port}"))

    with pytest.raises(DeploymentFailed) as failed:
        deployment.start()

    assert str(failed.value) == (f"the deployment did not start: cannot reach the bus at "
                                 f"redis://127.0.0.1:{port}: Connection refused (no answer to PING within 5s)")


def test_simulate_clients_with_a_dead_bus_ends_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    result = run_script(SIMULATE, "--redis-url", f"redis://:s3cret@127.0.0.1:{port}",
                        "--dashboard-url", f"http://127.0.0.1:{free_port()}", "--api-key", "key",
                        "--clients", "3", cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    expected = f"error: cannot reach the bus at redis://***@127.0.0.1:{port}: Connection refused"
    assert result.stderr.splitlines() == [expected]


def test_simulate_clients_with_a_wrong_password_ends_in_one_line(tmp_path: Path,
                                                                  valkey_server: EmbeddedValkey) -> None:
    port = urlsplit(valkey_server.url).port
    result = run_script(SIMULATE, "--redis-url", f"redis://nobody:wrong@127.0.0.1:{port}",
                        "--dashboard-url", f"http://127.0.0.1:{free_port()}", "--api-key", "key",
                        "--clients", "3", cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("error: the deployment's credentials were refused: redis at "
                           f"127.0.0.1:{port} refused user 'nobody'")


def test_the_launcher_stops_with_one_line_when_the_bucket_does_not_exist(
        tmp_path: Path, valkey_server: EmbeddedValkey, s3_endpoint: str, s3_bucket: str) -> None:
    """Before any service starts: otherwise each would exit, and be restarted, with the reason in
    its own log only."""
    env = {**launcher_env(tmp_path, valkey_server.url), "FL_BLOB_BUCKET": "no-such-bucket",
           "FL_BLOB_ENDPOINT_URL": s3_endpoint}
    result = run_script(DEPLOY, env=env)

    assert result.returncode == 1, result.stderr
    line = result.stderr.splitlines()[-1]  # after the bus's line
    assert line.startswith(f"error: the blob store in s3://no-such-bucket/fl/ at {s3_endpoint} cannot be used: ")
    assert "NoSuchBucket" in line
    assert "Found credentials" not in result.stderr  # botocore's chatter stays out of the launcher's lines
    assert not deployment_file(tmp_path).exists()
