"""REST bodies: the key is checked and the size bounded before a body is read, so an
unauthenticated or oversized request costs the dashboard nothing (it is answered 401 or 413)."""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn

from federated_learning.config import Settings
from federated_learning.dashboard.limits import MAX_JSON_BODY_BYTES
from federated_learning.dashboard.main import create_app
from federated_learning.protocol.keys import Keys
from federated_learning.services.dashboard import server_config
from federated_learning.services.runtime import ServiceContext
from tests.integration.conftest import TEST_API_KEY
from tests.ports import free_port

BODY_ROUTES = ["/api/training/start", "/api/training/t/stop", "/api/training/t/rollback", "/api/orgs",
               "/api/orgs/acme/keys", "/api/join-tokens", "/api/models", "/sync_model"]


@pytest.fixture
async def port(redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[int]:
    settings = Settings(dashboard_port=free_port(), api_key=TEST_API_KEY, metrics_port_base=0,
                        data_dir=tmp_path / "data", max_blob_bytes=4 << 20)
    ctx = ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0")
    server = uvicorn.Server(server_config(create_app(ctx), settings))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the dashboard did not start"
        await asyncio.sleep(0.02)
    yield settings.dashboard_port
    server.should_exit = True
    await task


async def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send ``head`` (and ``body``) on a plain socket; the status and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    rest = await asyncio.wait_for(reader.read(65536), timeout=10)
    writer.close()
    return int(status_line.split()[1]), rest


@pytest.mark.parametrize("route", BODY_ROUTES)
async def test_a_body_without_a_valid_key_is_refused_before_it_is_read(port: int, route: str) -> None:
    big = b'{"name": "' + b"x" * (20 << 20) + b'"}'
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            try:
                response = await http.post(route, content=big, headers={"Content-Type": "application/json",
                                                                           **headers})
            except httpx.WriteError:
                continue  # answered and closed while the client was still sending: fine
            assert response.status_code in (401, 413), response.text
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


async def test_a_declared_size_over_the_limit_is_refused_before_any_byte_of_the_body(port: int) -> None:
    status, body = await raw_request(port, (
        f"POST /api/training/start HTTP/1.1\r\nHost: x\r\nX-API-Key: {TEST_API_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000000000000\r\n"))
    assert status == 413 and b"exceeds" in body
    status, body = await raw_request(port, (
        f"POST /api/training/start HTTP/1.1\r\nHost: x\r\nX-API-Key: {TEST_API_KEY}\r\n"
        f"Content-Length: {MAX_JSON_BODY_BYTES + 1}\r\n"))
    assert status == 413


async def test_a_chunked_body_that_grows_past_the_limit_is_refused(port: int) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(4):
            yield b"x" * (MAX_JSON_BODY_BYTES // 2)
        yield b'"}'

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": TEST_API_KEY}) as http:
        response = await http.post("/api/training/start", content=chunks(),
                                   headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "exceeds" in response.json()["detail"]
        small = await http.post("/api/training/start", json={"dataset": "d", "model": {"kind": "memory_bank",
                                                                                        "feature_dim": 4}})
        assert small.status_code == 202, small.text
        assert json.loads(small.text)["training_id"]


@pytest.mark.parametrize("route", ["/api/training/start", "/api/orgs"])
async def test_json_nested_deeper_than_the_parser_can_go_is_refused_and_counted_once(
        port: int, redis: aioredis.Redis, route: str) -> None:
    body = b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": TEST_API_KEY}) as http:
        response = await http.post(route, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "nested too deeply" in response.text
    counts = {k.decode(): int(v) for k, v in (await redis.hgetall(Keys().rejections)).items()}
    assert counts == {"rest:invalid_body": 1}, counts
