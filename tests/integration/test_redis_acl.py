"""Locked-down Redis: each role logs in as its own ACL user, on a server of its own.

The server is a separate embedded valkey-server whose default user (with a password) is
the administrator; the users are created the way the launcher creates them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from agents.client import FederatedClient
from agents.data import make_client_datasets
from agents.simulation import simulated_agent_ids
from federated_learning.bus.blobs import RedisBlobStore
from federated_learning.bus.connection import RedisRefused, connect, with_credentials
from federated_learning.bus.consumer import ensure_group
from federated_learning.bus.embedded import EmbeddedValkey
from federated_learning.config import Settings
from federated_learning.dashboard.main import create_app
from federated_learning.deploy import acl
from federated_learning.deploy.access import plain_url, provision_at_start, role_urls
from federated_learning.deploy.launcher import main as launcher_main
from federated_learning.protocol.keys import GROUP_AGENT, GROUP_AGGREGATOR, Keys
from federated_learning.protocol.messages import Heartbeat, encode
from federated_learning.services.runtime import ServiceContext, read_backlogs
from tests.integration.conftest import (
    TEST_API_KEY,
    System,
    digits_config,
    start_training,
    wait_for_status,
)

KEYS = Keys()
ROUND_AGENTS = simulated_agent_ids(4)
ADMIN_PASSWORD = "admin-password-0123456789"


@dataclass(frozen=True)
class AclServer:
    url: str
    data_dir: Path

    def login(self, user: str, password: str | None = None) -> str:
        secret = password or acl.password_for(self.data_dir, user, create=False)
        return with_credentials(plain_url(self.url), user, secret)

    def agent(self, agent_id: str) -> str:
        return self.login(acl.agent_user_name(KEYS, agent_id))


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    root = tmp_path_factory.mktemp("acl")
    server = EmbeddedValkey(root / "redis", password=ADMIN_PASSWORD)
    url = server.start()
    settings = Settings(redis_acl=True, redis_acl_agents=["a1", "a2", *ROUND_AGENTS], data_dir=root)
    provision_at_start(settings, url, root, save=False)
    yield AclServer(url, root)
    server.stop()


@pytest.fixture
async def admin(acl_server: AclServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(acl_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def login(acl_server: AclServer, admin: aioredis.Redis) -> AsyncIterator[object]:
    opened: list[aioredis.Redis] = []

    async def open_as(url: str) -> aioredis.Redis:
        client = await connect(url, attempts=1)
        opened.append(client)
        return client

    yield open_as
    await asyncio.gather(*(client.aclose() for client in opened))


def services_url(server: AclServer) -> str:
    return server.login(acl.services_user_name(KEYS))


def dashboard_url(server: AclServer) -> str:
    return server.login(acl.dashboard_user_name(KEYS))


def test_passwords_are_private_files_in_the_deployments_secrets(acl_server: AclServer) -> None:
    folder = acl.secrets_dir(acl_server.data_dir)
    names = {path.name for path in folder.iterdir()}
    assert {"fl-services", "fl-dashboard", "fl-agent-a1", "fl-agent-a2"} <= names
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in folder.iterdir())
    assert acl.provisioned_agents(KEYS, acl_server.data_dir) == sorted(["a1", "a2", *ROUND_AGENTS])


async def test_services_user_runs_the_pipeline_commands_under_the_prefix(acl_server: AclServer, login) -> None:
    services = await login(services_url(acl_server))
    await ensure_group(services, KEYS.job_stream, GROUP_AGGREGATOR)
    await services.xadd(KEYS.job_stream, {"m": "{}"})
    reply = await services.xreadgroup(GROUP_AGGREGATOR, "aggregator-0", {KEYS.job_stream: ">"}, count=1)
    await services.xack(KEYS.job_stream, GROUP_AGGREGATOR, reply[0][1][0][0])
    async with services.pipeline(transaction=True) as pipe:
        pipe.hset(KEYS.versions("t"), "1", "{}")
        pipe.set(KEYS.training("t"), "{}")
        await pipe.execute()
    backlogs = {b.name: b for b in await read_backlogs(services, KEYS)}
    assert backlogs[f"{KEYS.job_stream}/{GROUP_AGGREGATOR}"].length == 1
    assert "used_memory" in await services.info("memory")
    with pytest.raises(NoPermissionError):
        await services.set("other-deployment:x", "1")
    with pytest.raises(NoPermissionError):
        await services.flushall()


async def test_agent_joins_uploads_and_reads_its_own_inbox(acl_server: AclServer, login) -> None:
    services = await login(services_url(acl_server))
    agent = await login(acl_server.agent("a1"))
    inbox = KEYS.inbox_stream("a1")
    await ensure_group(agent, inbox, GROUP_AGENT)
    await agent.xadd(KEYS.agent_stream, encode(Heartbeat(agent_id="a1")))  # type: ignore[arg-type]
    digest = await RedisBlobStore(agent, KEYS, max_bytes=1024).put(b"an update", ttl_s=60, owner="a1")
    assert await RedisBlobStore(services, KEYS, max_bytes=1024).get(digest, owner="a1") == b"an update"
    await agent.xadd(KEYS.update_stream, {"m": digest})
    await services.xadd(inbox, {"m": "a task"})
    [(_stream, [(entry_id, fields)])] = await agent.xreadgroup(GROUP_AGENT, "a1", {inbox: ">"}, count=1)
    assert fields == {b"m": b"a task"}
    assert await agent.xack(inbox, GROUP_AGENT, entry_id) == 1
    assert await services.xlen(KEYS.agent_stream) == 1 and await services.xlen(KEYS.update_stream) == 1


@pytest.mark.parametrize("action", [
    "read_other_inbox", "peek_other_inbox", "write_other_inbox", "write_version", "write_control",
    "read_training", "read_update_notices", "delete_blob", "overwrite_model_blob", "write_other_upload",
])
async def test_agent_credentials_cannot_reach_beyond_its_own_role(
        acl_server: AclServer, login, admin: aioredis.Redis, action: str) -> None:
    await ensure_group(admin, KEYS.inbox_stream("a2"), GROUP_AGENT)
    agent = await login(acl_server.agent("a1"))
    attempts = {
        "read_other_inbox": lambda: agent.xreadgroup(GROUP_AGENT, "a1", {KEYS.inbox_stream("a2"): ">"}),
        "peek_other_inbox": lambda: agent.xrange(KEYS.inbox_stream("a2")),
        "write_other_inbox": lambda: agent.xadd(KEYS.inbox_stream("a2"), {"m": "forged task"}),
        "write_version": lambda: agent.hset(KEYS.versions("t"), "9", "{}"),
        "write_control": lambda: agent.xadd(KEYS.control_stream, {"m": "{}"}),
        "read_training": lambda: agent.get(KEYS.training("t")),
        "read_update_notices": lambda: agent.xrange(KEYS.update_stream),
        "delete_blob": lambda: agent.delete(KEYS.blob("0" * 64)),
        "overwrite_model_blob": lambda: agent.set(KEYS.blob("0" * 64), b"garbage"),
        "write_other_upload": lambda: agent.set(KEYS.blob("0" * 64, "a2"), b"forged"),
    }
    with pytest.raises(NoPermissionError):
        await attempts[action]()
    assert await admin.xlen(KEYS.inbox_stream("a2")) == 0
    assert await admin.exists(KEYS.versions("t"), KEYS.control_stream) == 0


async def test_agent_reads_models_and_writes_only_its_own_uploads(
        acl_server: AclServer, login, admin: aioredis.Redis) -> None:
    from federated_learning.bus.blobs import RedisBlobStore

    model = await RedisBlobStore(admin, KEYS, max_bytes=1 << 20).put(b"model bytes")
    agent = await login(acl_server.agent("a1"))
    own = RedisBlobStore(agent, KEYS, max_bytes=1 << 20)

    assert await own.get(model) == b"model bytes"  # the global model is readable
    upload = await own.put(b"an update", owner="a1")
    assert await RedisBlobStore(admin, KEYS, max_bytes=1 << 20).get(upload, owner="a1") == b"an update"
    with pytest.raises(NoPermissionError):
        await own.put(b"an update", owner="a2")
    with pytest.raises(NoPermissionError):
        await agent.set(KEYS.blob(model), b"garbage", xx=True)
    assert await admin.get(KEYS.blob(model)) == b"model bytes"
    # Where the blobs are, as the coordinator publishes it: every agent reads it, none writes it.
    await admin.set(KEYS.blob_store, b'{"kind": "redis"}')
    assert await agent.get(KEYS.blob_store) == b'{"kind": "redis"}'
    with pytest.raises(NoPermissionError):
        await agent.set(KEYS.blob_store, b'{"kind": "folder"}')


async def test_a_wrong_password_is_refused_at_once(acl_server: AclServer) -> None:
    wrong = acl_server.login(acl.agent_user_name(KEYS, "a1"), password="not-the-password")
    with pytest.raises(RedisRefused, match="refused user 'fl-agent-a1'"):
        await connect(wrong, attempts=20)


async def test_dashboard_user_serves_the_api_and_writes_only_its_keys(
        acl_server: AclServer, login, admin: aioredis.Redis, tmp_path: Path) -> None:
    dashboard = await login(dashboard_url(acl_server))
    settings = Settings(api_key=TEST_API_KEY, data_dir=tmp_path, metrics_port_base=0)
    app = create_app(ServiceContext(redis=dashboard, settings=settings, service="dashboard", instance="0"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                 headers={"X-API-Key": TEST_API_KEY}) as http:
        assert (await http.get("/api/health")).status_code == 200
        assert (await http.get("/api/system/health")).status_code == 200
        started = await http.post("/api/training/start", json={
            "dataset": "digits", "rounds": 1,
            "model": {"trainer": "softmax", "num_features": 64, "num_classes": 10}})
        assert started.status_code == 202
    assert await admin.xlen(KEYS.control_stream) == 1
    with pytest.raises(NoPermissionError):
        await dashboard.hset(KEYS.versions("t"), "1", "{}")


async def test_a_training_completes_with_every_role_on_its_own_user(
        acl_server: AclServer, login, admin: aioredis.Redis, settings: Settings) -> None:
    system = System(services_url(acl_server), settings)
    dashboard = await login(dashboard_url(acl_server))
    observer = await login(services_url(acl_server))
    datasets, _test = make_client_datasets(len(ROUND_AGENTS), "iid", 0)
    agents = []
    for agent_id, data in zip(ROUND_AGENTS, datasets, strict=True):
        agent = FederatedClient(agent_id, redis_url=acl_server.agent(agent_id),
                                heartbeat_interval_s=settings.heartbeat_interval_s)
        agent.add_dataset("digits", data.train.x, data.train.y, x_eval=data.eval.x, y_eval=data.eval.y)
        agents.append(agent)
    await admin.execute_command("ACL", "LOG", "RESET")
    await system.start()
    try:
        await asyncio.gather(*(agent.initialize() for agent in agents))
        await start_training(dashboard, "acl", digits_config(rounds=2, clients_per_round=4))
        state = await wait_for_status(observer, "acl", {"completed", "failed"})
    finally:
        await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)
        await system.stop()
    assert state.status == "completed", state.reason
    assert await observer.hlen(KEYS.versions("acl")) == 3
    assert await observer.hget(KEYS.rejections, "updates:bad_signature") is None
    assert await admin.execute_command("ACL", "LOG") == [], "a role was denied a command it used"


def test_provision_command_creates_agent_users_without_logging_passwords(
        acl_server: AclServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FL_REDIS_KEY_PREFIX", "cli")  # other users than the other tests'
    with caplog.at_level(logging.INFO):
        code = launcher_main(["--provision-acl", "--admin-url", acl_server.url, "--agents", "b1, b2"])
    assert code == 0
    folder = acl.secrets_dir(tmp_path / "data")
    assert sorted(p.name for p in folder.iterdir()) == [
        "cli-agent-b1", "cli-agent-b2", "cli-dashboard", "cli-services"]
    passwords = [p.read_text() for p in folder.iterdir()]
    assert all(len(password) >= 32 and password not in caplog.text for password in passwords)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir())
    assert acl.secrets_dir(tmp_path / "data").name in caplog.text


def test_launcher_gives_each_role_its_own_login(acl_server: AclServer) -> None:
    settings = Settings(redis_acl=True, data_dir=acl_server.data_dir)
    urls = role_urls(settings, plain_url(acl_server.url), acl_server.data_dir)
    assert urls.for_service("coordinator").startswith("redis://fl-services:")
    assert urls.for_service("dashboard").startswith("redis://fl-dashboard:")
    assert ADMIN_PASSWORD not in urls.services + urls.dashboard
