"""The live WebSocket answers bad frames with an error and stays up: binary frames, oversized or
deeply nested JSON, ids that are no ids, too many topics; a key holds a bounded number of sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import uvicorn
import websockets

from federated_learning.config import Settings
from federated_learning.dashboard.main import create_app
from federated_learning.dashboard.routes.live import MAX_TOPICS, TOO_MANY_CLOSE
from federated_learning.services.dashboard import server_config
from federated_learning.services.runtime import ServiceContext
from tests.integration.conftest import TEST_API_KEY
from tests.ports import free_port

SOCKETS_PER_KEY = 3


@pytest.fixture
async def ws_url(redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[str]:
    settings = Settings(dashboard_port=free_port(), api_key=TEST_API_KEY, metrics_port_base=0,
                        data_dir=tmp_path / "data", max_sockets_per_key=SOCKETS_PER_KEY)
    ctx = ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0")
    server = uvicorn.Server(server_config(create_app(ctx), settings))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the dashboard did not start"
        await asyncio.sleep(0.02)
    yield f"ws://127.0.0.1:{settings.dashboard_port}/ws"
    server.should_exit = True
    await task


async def answer(socket: websockets.ClientConnection, frame: str | bytes) -> dict[str, object]:
    await socket.send(frame)
    reply: dict[str, object] = json.loads(await asyncio.wait_for(socket.recv(), timeout=10))
    return reply


async def test_bad_frames_get_an_error_and_the_socket_goes_on(ws_url: str) -> None:
    async with websockets.connect(f"{ws_url}/probe?api_key={TEST_API_KEY}") as socket:
        for frame in (b"\x00\x01binary", "{" * 100_000, "[" * 900 + "]" * 900, "not json",
                      json.dumps({"action": "subscribe", "training_id": {"nested": [1, 2]}}),
                      json.dumps({"action": "subscribe", "training_id": "../x"}),
                      json.dumps({"action": "drop"})):
            reply = await answer(socket, frame)
            assert reply["type"] == "error" and "expected" in str(reply["message"])
        for i in range(MAX_TOPICS):
            assert (await answer(socket, json.dumps({"action": "subscribe", "training_id": f"t{i}"})))["type"] \
                == "subscribed"
        over = await answer(socket, json.dumps({"action": "subscribe", "training_id": "one-more"}))
        assert over["type"] == "error" and over["code"] == 429
        assert (await answer(socket, json.dumps({"action": "subscribe", "training_id": "*"})))["type"] == "error"
        assert (await answer(socket, json.dumps({"action": "unsubscribe", "training_id": "t0"})))["type"] \
            == "unsubscribed"
        assert (await answer(socket, json.dumps({"action": "subscribe", "training_id": "*"})))["type"] \
            == "subscribed"


async def test_a_key_holds_a_bounded_number_of_sockets(ws_url: str, redis: aioredis.Redis) -> None:
    held = [await websockets.connect(f"{ws_url}/held-{i}?api_key={TEST_API_KEY}") for i in range(SOCKETS_PER_KEY)]
    try:
        extra = await websockets.connect(f"{ws_url}/extra?api_key={TEST_API_KEY}")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(extra.recv(), timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == TOO_MANY_CLOSE
        await held[0].close()
        for _ in range(200):  # the server notices the close, then a new socket is taken
            replacement = await websockets.connect(f"{ws_url}/again?api_key={TEST_API_KEY}")
            try:
                reply = await answer(replacement, json.dumps({"action": "subscribe", "training_id": "*"}))
                assert reply["type"] == "subscribed"
                await replacement.close()
                break
            except websockets.ConnectionClosed:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("a socket closed by its client was never released")
    finally:
        await asyncio.gather(*(socket.close() for socket in held))
