"""While the bus is down the health routes answer within their bound, 503 with the reason,
and answer normally again once it is back (the dashboard's client reconnects)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from federated_learning.bus.connection import client_from_url
from federated_learning.bus.embedded import EmbeddedValkey
from federated_learning.config import Settings
from federated_learning.dashboard.main import create_app
from federated_learning.dashboard.routes.system import BUS_TIMEOUT_S
from federated_learning.services.runtime import ServiceContext

ANSWER_BOUND_S = BUS_TIMEOUT_S + 1.5


async def test_health_answers_503_bus_unreachable_within_its_bound_while_the_bus_is_down(
        tmp_path: Path, settings: Settings) -> None:
    server = EmbeddedValkey(tmp_path / "valkey")
    server.start()
    redis = client_from_url(server.url)  # the services' client: it retries a lost connection
    app = create_app(ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0"))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            assert (await http.get("/api/system/health")).status_code == 200
            server.stop()

            began = time.monotonic()
            system = await http.get("/api/system/health")
            system_s = time.monotonic() - began
            began = time.monotonic()
            plain = await http.get("/api/health")
            plain_s = time.monotonic() - began

            server.start()
            back = await http.get("/api/system/health")
    finally:
        server.stop()
        await redis.aclose()

    assert system.status_code == 503 and system_s < ANSWER_BOUND_S
    assert system.json()["health_status"] == "critical"
    assert system.json()["reasons"] == [f"bus unreachable: no answer within {BUS_TIMEOUT_S:.0f}s"]
    assert plain.status_code == 503 and plain_s < ANSWER_BOUND_S
    assert plain.json()["status"] == "bus unreachable"
    assert back.status_code == 200
    assert not any(reason.startswith("bus unreachable") for reason in back.json()["reasons"])
