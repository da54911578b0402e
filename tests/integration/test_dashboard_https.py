"""The dashboard process serves HTTPS with the configured certificate; clients verify it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn

from agents.http_sync import SyncSettings
from federated_learning.config import Settings
from federated_learning.dashboard.main import create_app
from federated_learning.deploy.local import LocalDeployment
from federated_learning.services.dashboard import server_config
from federated_learning.services.runtime import ServiceContext
from tests.integration.certificates import Pki, make_pki
from tests.integration.conftest import TEST_API_KEY
from tests.ports import free_port


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def https_settings(pki: Pki, tmp_path: Path) -> Settings:
    return Settings(dashboard_port=free_port(), dashboard_tls_cert_file=pki.server_cert,
                    dashboard_tls_key_file=pki.server_key, dashboard_tls_ca_file=pki.ca,
                    api_key=TEST_API_KEY, metrics_port_base=0, data_dir=tmp_path / "data")


@pytest.fixture
async def dashboard(redis: aioredis.Redis, https_settings: Settings) -> AsyncIterator[str]:
    ctx = ServiceContext(redis=redis, settings=https_settings, service="dashboard", instance="0")
    server = uvicorn.Server(server_config(create_app(ctx), https_settings))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the dashboard did not start"
        await asyncio.sleep(0.02)
    yield f"https://127.0.0.1:{https_settings.dashboard_port}"
    server.should_exit = True
    await task


async def test_dashboard_serves_health_over_https_to_a_client_that_trusts_its_ca(
        dashboard: str, pki: Pki) -> None:
    verify = ssl.create_default_context(cafile=str(pki.ca))
    async with httpx.AsyncClient(verify=verify) as client:
        response = await client.get(f"{dashboard}/api/health")
    assert response.status_code == 200


async def test_a_client_without_the_ca_fails_verification(dashboard: str) -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(f"{dashboard}/api/health")


async def test_http_sync_client_verifies_with_fed_ca_bundle(dashboard: str, pki: Pki) -> None:
    sync = SyncSettings.from_environment({"FED_SERVER_URL": dashboard, "FED_CA_BUNDLE": str(pki.ca)})

    def get_health() -> int:
        with httpx.Client(verify=sync.verify()) as client:
            return client.get(f"{sync.server_url}/api/health").status_code

    assert await asyncio.to_thread(get_health) == 200


def test_a_missing_fed_ca_bundle_is_named(tmp_path: Path) -> None:
    sync = SyncSettings.from_environment({"FED_CA_BUNDLE": str(tmp_path / "nope.pem")})
    with pytest.raises(ValueError, match="FED_CA_BUNDLE is .*nope.pem.*no such file"):
        sync.verify()


async def test_the_launchers_health_check_uses_https_and_the_configured_ca(
        dashboard: str, https_settings: Settings, pki: Pki, tmp_path: Path) -> None:
    deployment = LocalDeployment(https_settings, None, tmp_path / "data")
    assert deployment.dashboard_url == dashboard.replace("127.0.0.1", https_settings.dashboard_host)
    async with httpx.AsyncClient(verify=deployment.dashboard_verify) as client:
        assert (await client.get(f"{deployment.dashboard_url}/api/health")).status_code == 200
