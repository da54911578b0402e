"""The deployed system's secrets: owner-only files, none in a service's environment, and agents
that log in as their own Redis users by default."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from federated_learning.bus.connection import with_credentials
from federated_learning.deploy.access import plain_url
from federated_learning.protocol.keys import Keys
from tests.e2e.conftest import ROOT, Deployment

pytestmark = pytest.mark.e2e
KEYS = Keys()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def deployment_secrets(deployment: Deployment) -> dict[str, str]:
    """Every secret the deployment made, by the file that holds it."""
    folder = deployment.data_dir / "secrets"
    return {str(path.relative_to(folder)): path.read_text().strip()
            for path in folder.rglob("*") if path.is_file()}


def service_environment(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")


def provision(deployment: Deployment, agent_id: str) -> None:
    """The operator's step: ``--provision-acl --agents ID`` against the running deployment."""
    provisioned = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "deploy-federated-learning.py"), "--provision-acl",
         "--agents", agent_id], env=deployment.env, cwd=deployment.data_dir.parent,
        capture_output=True, text=True, timeout=60, check=False)
    assert provisioned.returncode == 0, provisioned.stderr


def test_secret_files_are_owner_only_and_no_service_holds_a_secret_in_its_environment(
        deployment: Deployment) -> None:
    run = deployment.data_dir / "run"
    assert mode(run) == 0o700 and mode(run / "deployment.json") == 0o600
    assert mode(deployment.data_dir / "secrets") == 0o700
    secrets = deployment_secrets(deployment)
    assert {"api_key", "redis_password", "redis-acl/fl-services", "redis-acl/fl-dashboard"} <= set(secrets)
    assert {mode(deployment.data_dir / "secrets" / name) for name in secrets} == {0o600}

    for service, records in deployment.health()["services"].items():
        for record in records:
            environment = service_environment(int(record["pid"]))
            assert "FL_SECRETS_DIR=" in environment, service
            leaked = [name for name, value in secrets.items() if value in environment]
            assert not leaked, f"{service} has {leaked} in its environment"

    deployment.stop()
    assert not (run / "secrets").exists() and not (run / "deployment.json").exists()


async def test_by_default_an_agent_logs_in_as_its_own_user_without_the_services_powers(
        deployment: Deployment) -> None:
    info = json.loads((deployment.data_dir / "run" / "deployment.json").read_text())
    assert info["redis_acl"] is True and info["redis_url"].startswith("redis://fl-services:")
    provision(deployment, "bot-1")
    password_file = Path(info["redis_acl_secrets"]) / "fl-agent-bot-1"
    assert mode(password_file) == 0o600

    agent = aioredis.Redis.from_url(with_credentials(plain_url(info["redis_url"]), "fl-agent-bot-1",
                                                     password_file.read_text()))
    try:
        assert await agent.ping()
        with pytest.raises(NoPermissionError):
            await agent.xadd(KEYS.control_stream, {"m": "{}"})
        with pytest.raises(NoPermissionError):
            await agent.xrange(KEYS.inbox_stream("bot-2"))
    finally:
        await agent.aclose()
