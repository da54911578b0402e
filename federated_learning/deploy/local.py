"""Run the launcher as a child process and wait until the deployment is healthy (demo, experiments)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Self

import httpx

from federated_learning.config import Settings
from federated_learning.deploy.launcher import read_deployment

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 120.0
PROVISION_TIMEOUT_S = 60.0
LAUNCHER_ERROR = "error: "
"""How the launcher's one-line refusals start (a bad config, a bus that does not answer)."""
LAUNCHER = Path(__file__).resolve().parents[2] / "scripts" / "deploy-federated-learning.py"


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop the child deployment."""
    def _exit(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


class DeploymentFailed(RuntimeError):
    """The deployment exited or did not become healthy; the message holds the log tail."""


class LocalDeployment:
    """``scripts/deploy-federated-learning.py`` as a child, with its data in ``data_dir``."""

    def __init__(self, settings: Settings, config: Path | None, data_dir: Path,
                 extra_env: dict[str, str] | None = None, *, acl_agents: list[str] | None = None) -> None:
        """``acl_agents``: in ACL mode, the agent ids whose users the launcher creates at start
        (e.g. the simulated agents of a demo), added to the configured ``redis_acl_agents``."""
        self.settings = settings
        self.config = config
        self.data_dir = data_dir
        self.env = {**os.environ, "FL_DATA_DIR": str(data_dir), **(extra_env or {})}
        if acl_agents:
            self.env["FL_REDIS_ACL_AGENTS"] = json.dumps(sorted({*settings.redis_acl_agents,
                                                                 *acl_agents}))
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def dashboard_url(self) -> str:
        return (f"{self.settings.dashboard_scheme}://{self.settings.dashboard_host}:"
                f"{self.settings.dashboard_port}")

    @property
    def dashboard_verify(self) -> ssl.SSLContext | bool:
        """How clients on this machine verify the dashboard: its configured CA, else the system."""
        ca_file = self.settings.dashboard_tls_ca_file
        return ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else True

    @property
    def agent_credentials_dir(self) -> Path | None:
        """Where the agents' ACL passwords are, when the running deployment is in ACL mode."""
        info = read_deployment(self.data_dir)
        return Path(info["redis_acl_secrets"]) if info.get("redis_acl") else None

    @property
    def redis_url(self) -> str:
        """The services' URL: for the operator's tools, not for agents (their own users in ACL mode)."""
        return str(read_deployment(self.data_dir)["redis_url"])

    @property
    def api_key(self) -> str:
        return str(read_deployment(self.data_dir)["api_key"])

    def provision_agents(self, agent_ids: list[str]) -> None:
        """In ACL mode, give ``agent_ids`` their own Redis users on the running deployment, as an
        operator does (``--provision-acl --agents``); without ACL mode there is nothing to do."""
        if self.agent_credentials_dir is None or not agent_ids:
            return
        command = [sys.executable, str(LAUNCHER), "--provision-acl", "--agents", ",".join(agent_ids)]
        command += ["--config", str(self.config)] if self.config else []
        result = subprocess.run(command, env=self.env, capture_output=True, text=True,
                                timeout=PROVISION_TIMEOUT_S, check=False)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if line.startswith(LAUNCHER_ERROR)]
            raise DeploymentFailed(f"provisioning the agents' Redis users failed: "
                                   f"{errors[-1] if errors else result.stderr[-2000:]}")

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(LAUNCHER)] + (["--config", str(self.config)] if self.config else [])
        with open(self.data_dir / "deploy.log", "ab") as log:
            self._log_start = log.tell()
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DeploymentFailed(self._exit_reason(self.process.returncode))
            try:
                health = httpx.get(f"{self.dashboard_url}/api/system/health", timeout=2,
                                   headers={"X-API-Key": self.api_key},
                                   verify=self.dashboard_verify).json()
                if health["health_status"] == "healthy":
                    return
            except (httpx.HTTPError, ValueError, KeyError, OSError):  # OSError: no deployment.json yet
                pass
            time.sleep(0.5)
        self.stop()
        raise DeploymentFailed(f"not healthy within {START_TIMEOUT_S:.0f}s; see {self.data_dir / 'logs'}")

    def _exit_reason(self, returncode: int) -> str:
        """The launcher's own one-line ``error:`` when it wrote one, else the log's tail."""
        with open(self.data_dir / "deploy.log", "rb") as file:
            file.seek(self._log_start)
            log = file.read().decode(errors="replace")
        errors = [line for line in log.splitlines() if line.startswith(LAUNCHER_ERROR)]
        if errors:
            return f"the deployment did not start: {errors[-1].removeprefix(LAUNCHER_ERROR)}"
        return f"the deployment exited with {returncode}:\n{log[-2000:]}"

    def wait(self) -> None:
        if self.process is not None:
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def __enter__(self) -> Self:
        stop_on_sigterm()
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
