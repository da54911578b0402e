"""Organisations, projects and API keys: keys, roles, and every boundary between organisations.

Each crossing attempt must fail with 401/403 and change nothing (state compared before/after).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
import websockets

from agents.client import FederatedClient
from agents.data import make_client_datasets
from federated_learning.access import Role
from federated_learning.config import Settings
from federated_learning.dashboard.main import create_app
from federated_learning.dashboard.routes.live import UNAUTHORIZED_CLOSE
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import TaskKind, UpdateSubmitted, encode
from federated_learning.records.agents import AgentRegistry
from federated_learning.records.organisations import Organisations
from federated_learning.services.runtime import ServiceContext
from tests.integration.conftest import TEST_API_KEY, wait_for_status

KEYS = Keys()
BODY: dict[str, Any] = {
    "dataset": "digits", "model": {"trainer": "softmax", "num_features": 64, "num_classes": 10},
    "rounds": 2, "clients_per_round": 4, "min_clients": 2,
    "local": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1}, "privacy_level": "none",
}

Http = Callable[[str | None], httpx.AsyncClient]


@pytest.fixture
async def http(redis: aioredis.Redis, settings: Settings) -> AsyncIterator[Http]:
    """A factory of dashboard clients, each sending one key (or none)."""
    app = create_app(ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0"))
    clients: list[httpx.AsyncClient] = []

    def make(key: str | None) -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                   headers={"X-API-Key": key} if key else {})
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def new_key(http: Http, org: str, role: str, name: str = "k") -> str:
    response = await http(TEST_API_KEY).post(f"/api/orgs/{org}/keys", json={"name": name, "role": role})
    assert response.status_code == 201, response.text
    return str(response.json()["api_key"])


async def setup_orgs(http: Http) -> None:
    root = http(TEST_API_KEY)
    for org in ("acme", "globex"):
        assert (await root.post("/api/orgs", json={"org_id": org})).status_code == 201
    for org, project in (("acme", "vision"), ("acme", "lab"), ("globex", "lab")):
        assert (await root.post(f"/api/orgs/{org}/projects", json={"project_id": project})).status_code == 201


async def all_redis_text(redis: aioredis.Redis) -> str:
    """Every key name and every string/hash value in the server, as one text."""
    parts: list[str] = []
    async for key in redis.scan_iter(count=500):
        parts.append(key.decode())
        kind = (await redis.type(key)).decode()
        if kind == "string":
            parts.append((await redis.get(key) or b"").decode(errors="replace"))
        elif kind == "hash":
            parts.extend(f"{k.decode()}={v.decode(errors='replace')}" for k, v in (await redis.hgetall(key)).items())
    return "\n".join(parts)


# -- keys ------------------------------------------------------------------------------------


async def test_a_key_is_shown_once_and_only_its_hash_is_stored(http: Http, redis: aioredis.Redis) -> None:
    await setup_orgs(http)
    created = (await http(TEST_API_KEY).post("/api/orgs/acme/keys", json={"name": "alice", "role": "admin"})).json()
    key = created["api_key"]
    assert key.startswith(f"flk_{created['key_id']}_") and "key_hash" not in created

    listed = (await http(key).get("/api/orgs/acme/keys")).json()
    assert [k["key_id"] for k in listed] == [created["key_id"]]
    assert "api_key" not in listed[0] and "key_hash" not in listed[0]
    stored = await redis.hget(KEYS.api_keys, created["key_id"])
    assert stored is not None and key not in stored.decode()
    assert key not in await all_redis_text(redis)
    assert (await http(key).get("/api/trainings")).status_code == 200


async def test_revoked_and_expired_keys_get_401_and_change_nothing(http: Http, redis: aioredis.Redis) -> None:
    await setup_orgs(http)
    revoked = await new_key(http, "acme", "operator")
    key_id = revoked.split("_")[1]
    assert (await http(TEST_API_KEY).delete(f"/api/orgs/acme/keys/{key_id}")).json()["revoked_at"] is not None
    expired, _record = await Organisations(redis, KEYS).create_key("acme", Role.OPERATOR, "old", time.time() - 1)

    for key in (revoked, expired, None, "flk_0123456789ab_guessed", "wrong"):
        client = http(key)
        assert (await client.get("/api/trainings")).status_code == 401
        assert (await client.post("/api/training/start", json=BODY)).status_code == 401
    assert await redis.xlen(KEYS.control_stream) == 0
    assert int(await redis.hget(KEYS.rejections, "rest:unauthorized")) == 10


async def test_roles_grant_read_control_and_manage_in_turn(http: Http, redis: aioredis.Redis) -> None:
    await setup_orgs(http)
    viewer, operator, admin = [http(await new_key(http, "acme", role)) for role in ("viewer", "operator", "admin")]

    assert (await viewer.get("/api/trainings")).status_code == 200
    assert (await viewer.post("/api/training/start", json=BODY)).status_code == 403
    assert (await viewer.post("/api/join-tokens", json={"project_id": "vision"})).status_code == 403
    assert await redis.xlen(KEYS.control_stream) == 0

    started = await operator.post("/api/training/start", json={**BODY, "project_id": "vision", "training_id": "v1"})
    assert started.status_code == 202 and started.json()["training_id"] == "acme.v1"
    assert (await operator.post("/api/orgs/acme/keys", json={"name": "x", "role": "admin"})).status_code == 403
    assert (await operator.post("/api/orgs/acme/projects", json={"project_id": "new"})).status_code == 403

    assert (await admin.post("/api/orgs/acme/projects", json={"project_id": "new"})).status_code == 201
    assert (await admin.post("/api/orgs/acme/keys", json={"name": "bob", "role": "viewer"})).status_code == 201
    assert (await admin.post("/api/orgs", json={"org_id": "evil"})).status_code == 403
    assert (await admin.post("/api/orgs/globex/keys", json={"name": "x", "role": "admin"})).status_code == 403
    assert (await admin.post("/api/orgs/globex/projects", json={"project_id": "x"})).status_code == 403
    assert (await admin.post("/api/training/start", json={**BODY, "project_id": "missing"})).status_code == 404
    assert [o["org_id"] for o in (await admin.get("/api/orgs")).json()] == ["acme"]
    assert len(await Organisations(redis, KEYS).keys("acme")) == 4
    assert await Organisations(redis, KEYS).keys("globex") == []
    assert await Organisations(redis, KEYS).get_org("evil") is None
    assert int(await redis.hget(KEYS.rejections, "rest:forbidden")) == 7


async def test_an_organisation_names_no_training_outside_its_pattern(http: Http) -> None:
    await setup_orgs(http)
    operator = http(await new_key(http, "acme", "operator"))
    assert (await operator.post("/api/training/start", json={**BODY, "training_id": "globex.x"})).status_code == 422
    root = http(TEST_API_KEY)
    assert (await root.post("/api/training/start", json={**BODY, "training_id": "acme.y"})).status_code == 422
    started = await root.post("/api/training/start", json={**BODY, "org_id": "globex", "project_id": "lab"})
    assert started.json()["training_id"].startswith("globex.")


# -- boundaries ------------------------------------------------------------------------------


async def project_agents(redis_url: str, settings: Settings, token: str, prefix: str, count: int,
                         seed: int) -> list[FederatedClient]:
    clients, _test = make_client_datasets(count, "iid", seed)
    agents = []
    for data in clients:
        agent = FederatedClient(f"{prefix}-{data.client_id:02d}", redis_url=redis_url, seed=seed,
                                heartbeat_interval_s=settings.heartbeat_interval_s, join_token=token)
        agent.add_dataset("digits", data.train.x, data.train.y, x_eval=data.eval.x, y_eval=data.eval.y)
        agents.append(agent)
    await asyncio.gather(*(a.initialize() for a in agents))
    return agents


async def join_token(client: httpx.AsyncClient, project: str) -> str:
    response = await client.post("/api/join-tokens", json={"project_id": project})
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


async def snapshot(redis: aioredis.Redis, training_id: str) -> dict[str, Any]:
    state = json.loads(await redis.get(KEYS.training(training_id)))
    state.pop("updated_at")
    return {"state": state, "control": await redis.xlen(KEYS.control_stream),
            "versions": await redis.hlen(KEYS.versions(training_id)),
            "updates": await redis.xlen(KEYS.update_stream), "agents": await redis.hlen(KEYS.agents)}


async def wait_for_rejection(redis: aioredis.Redis, reason: str, count: int = 1) -> None:
    for _ in range(200):
        if int(await redis.hget(KEYS.rejections, reason) or 0) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {reason} rejection")


async def test_another_organisation_cannot_read_control_or_feed_a_training(
        http: Http, redis: aioredis.Redis, redis_url: str, settings: Settings, system) -> None:
    await setup_orgs(http)
    acme, globex = http(await new_key(http, "acme", "operator")), http(await new_key(http, "globex", "admin"))
    await system.start()
    vision = await project_agents(redis_url, settings, await join_token(acme, "vision"), "vision", 4, 0)
    lab = await project_agents(redis_url, settings, await join_token(acme, "lab"), "lab", 3, 1)
    outsiders = await project_agents(redis_url, settings, await join_token(globex, "lab"), "globex", 3, 2)
    try:
        training_id = (await acme.post("/api/training/start", json={**BODY, "project_id": "vision"})).json()["training_id"]
        state = await wait_for_status(redis, training_id, {"completed"})
    finally:
        await asyncio.gather(*(a.close() for a in [*vision, *lab, *outsiders]), return_exceptions=True)

    assert training_id.startswith("acme.") and (state.org_id, state.project_id) == ("acme", "vision")
    assert set(state.selected) <= {a.agent_id for a in vision}
    assert [await redis.xlen(KEYS.inbox_stream(a.agent_id)) for a in [*lab, *outsiders]] == [0] * 6
    before = await snapshot(redis, training_id)

    base = f"/api/training/{training_id}"
    for path in (f"{base}/status", f"{base}/metrics", f"{base}/versions", f"{base}/versions/1/model",
                 f"{base}/versions/compare?a=1&b=2", f"{base}/privacy"):
        response = await globex.get(path)
        assert response.status_code == 403, path
    for path, body in ((f"{base}/stop", None), (f"{base}/rollback", {"version": 1})):
        assert (await globex.post(path, json=body)).status_code == 403, path
    sync = await globex.post("/sync_model", json={"client_id": "c", "training_id": training_id,
                                                  "weights": {"w": [[0.0]]}})
    assert sync.status_code == 403
    assert (await globex.get("/api/trainings")).json() == []
    assert [t["training_id"] for t in (await acme.get("/api/trainings")).json()] == [training_id]
    assert {a["agent_id"] for a in (await globex.get("/api/agents")).json()} == {a.agent_id for a in outsiders}
    assert await snapshot(redis, training_id) == before

    for agent in (lab[0], outsiders[0]):
        notice = UpdateSubmitted(kind=TaskKind.TRAIN, training_id=training_id, round=state.round, attempt=1,
                                 agent_id=agent.agent_id, num_examples=1, received_model_version=2,
                                 update_digest="0" * 64)
        await redis.xadd(KEYS.update_stream, encode(notice))  # type: ignore[arg-type]
    await wait_for_rejection(redis, "updates:wrong_project", 2)
    after = await snapshot(redis, training_id)
    assert after["state"] == before["state"] and after["versions"] == before["versions"]
    assert await redis.hlen(KEYS.round_updates(training_id, state.round + 1)) == 0


async def test_http_sync_feeds_only_its_own_organisations_project(
        http: Http, redis: aioredis.Redis, settings: Settings, system) -> None:
    await setup_orgs(http)
    acme, globex = http(await new_key(http, "acme", "operator")), http(await new_key(http, "globex", "operator"))
    await system.start()
    training_id = (await acme.post("/api/training/start", json={**BODY, "project_id": "vision"})).json()["training_id"]
    await wait_for_status(redis, training_id, {"paused"})  # no agents in the project yet
    weights = {"dense.weight": [[0.0] * 10 for _ in range(64)], "dense.bias": [0.0] * 10}

    assert (await globex.post("/sync_model", json={"client_id": "c", "training_id": training_id,
                                                   "weights": weights})).status_code == 403
    assert (await globex.post("/sync_model", json={"client_id": "c", "weights": weights})).status_code == 409
    assert await redis.hlen(KEYS.agents) == 0

    response = await acme.post("/sync_model", json={"client_id": "c", "weights": weights})
    assert response.status_code == 200, response.text
    agent_id = response.headers["X-Agent-Id"]
    assert agent_id == "http-acme.vision.c"
    registry = AgentRegistry(redis, KEYS, 10.0)
    for _ in range(100):
        if (record := await registry.get(agent_id)) is not None:
            break
        await asyncio.sleep(0.05)
    assert record is not None and record.project == ("acme", "vision") and record.volunteer
    assert await registry.tokens.all() == []  # the gateway's one-off token is gone once used


# -- WebSocket -------------------------------------------------------------------------------


@pytest.fixture
async def served(redis: aioredis.Redis, settings: Settings) -> AsyncIterator[tuple[str, ServiceContext]]:
    """The dashboard on a real port (the WebSocket needs a server), and its context."""
    ctx = ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0")
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"ws://127.0.0.1:{port}/ws", ctx
    server.should_exit = True
    await task


async def next_message(socket: websockets.ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(socket.recv(), 10))
        if message["type"] == kind:
            return message


async def test_websocket_needs_a_key_and_follows_only_its_organisation(
        http: Http, redis: aioredis.Redis, served: tuple[str, ServiceContext]) -> None:
    url, ctx = served
    await setup_orgs(http)
    globex_key = await new_key(http, "globex", "viewer")
    for query in ("", "?api_key=wrong"):
        async with websockets.connect(f"{url}/anon{query}") as socket:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == UNAUTHORIZED_CLOSE

    async with websockets.connect(f"{url}/g?api_key={globex_key}") as socket:
        await socket.send(json.dumps({"action": "subscribe", "training_id": "acme.secret"}))
        refused = await next_message(socket, "error")
        assert refused["code"] == 403 and refused["training_id"] == "acme.secret"
        await socket.send(json.dumps({"action": "subscribe", "training_id": "*"}))
        await next_message(socket, "subscribed")
        await ctx.emit("training_status", "acme's", training_id="acme.secret", status="running")
        await ctx.emit("agent_joined", "system-wide", agent_id="someone")
        await ctx.emit("training_status", "globex's", training_id="globex.mine", status="running")
        pushed = await next_message(socket, "training_status")
        assert pushed["training_id"] == "globex.mine"
        with contextlib.suppress(TimeoutError):
            extra = await asyncio.wait_for(socket.recv(), 0.5)
            raise AssertionError(f"unexpected push {extra!r}")
    assert int(await redis.hget(KEYS.rejections, "ws:unauthorized")) == 2

