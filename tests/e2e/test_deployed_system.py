"""The whole system as separate processes: training, metrics endpoints, WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import psutil
import websockets

from federated_learning.deploy.probes import metric_total
from tests.e2e.conftest import Deployment, training_body, wait_status

SCRAPE_INTERVAL_S = 0.02
SERVICES = {"coordinator", "aggregator", "privacy", "versions", "monitor", "dashboard"}
MOVING_PER_ROUND = (("coordinator", "fl_rounds_completed_total"), ("coordinator", "fl_round_seconds_count"),
                    ("aggregator", "fl_aggregation_seconds_count"))
"""The round counter and the histograms that gain (at least) one observation per round."""


def metrics_endpoints(deployment: Deployment) -> dict[str, str]:
    """The /metrics URL of every running service instance (each aggregator worker too),
    keyed ``service/instance``."""
    return {f"{service}/{record['instance']}": f"http://127.0.0.1:{record['metrics_port']}/metrics"
            for service, records in deployment.health()["services"].items() for record in records}


async def scrape(http: httpx.AsyncClient, endpoints: dict[str, str]) -> dict[str, str]:
    """The metrics text of every endpoint (fetched concurrently), by the same keys."""
    responses = await asyncio.gather(*(http.get(url) for url in endpoints.values()))
    for endpoint, response in zip(endpoints, responses, strict=True):
        assert response.status_code == 200, endpoint
    return {endpoint: response.text for endpoint, response in zip(endpoints, responses, strict=True)}


def service_total(scraped: dict[str, str], service: str, name: str) -> float:
    """``name`` summed over the instances of ``service`` in one scrape of every endpoint."""
    return sum(metric_total(text, name) for endpoint, text in scraped.items()
               if endpoint.split("/")[0] == service)


async def test_ten_agents_train_three_rounds_through_the_deployed_processes(deployment: Deployment, agents) -> None:
    ws_url = deployment.dashboard_url.replace("http", "ws") + f"/ws/e2e-test?api_key={deployment.api_key}"
    async with websockets.connect(ws_url) as socket, deployment.client() as http:
        await socket.send(json.dumps({"action": "subscribe", "training_id": "*"}))
        assert json.loads(await socket.recv())["type"] == "subscribed"
        endpoints = metrics_endpoints(deployment)
        assert {endpoint.split("/")[0] for endpoint in endpoints} >= SERVICES
        before = await scrape(http, endpoints)
        response = await http.post("/api/training/start", json=training_body(3))
        assert response.status_code == 202
        training_id = response.json()["training_id"]

        pushed: list[dict] = []
        async def collect() -> None:
            while True:
                pushed.append(json.loads(await socket.recv()))

        during: list[dict[str, str]] = []
        async def scrape_while_training() -> None:
            while True:
                during.append(await scrape(http, endpoints))
                await asyncio.sleep(SCRAPE_INTERVAL_S)
        collector = asyncio.create_task(collect())
        scraper = asyncio.create_task(scrape_while_training())
        status = await wait_status(http, training_id, {"completed", "failed"})
        scraper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scraper
        await asyncio.sleep(0.3)
        collector.cancel()

        assert status["status"] == "completed", status["reason"]
        metrics = (await http.get(f"/api/training/{training_id}/metrics")).json()
        assert [m["round"] for m in metrics] == [1, 2, 3]
        assert status["final_evaluation"]["accuracy"] > metrics[0]["eval_accuracy"] + 0.2
        versions = (await http.get(f"/api/training/{training_id}/versions")).json()
        assert [v["version"] for v in versions] == [0, 1, 2, 3]
        model = await http.get(f"/api/training/{training_id}/versions/3/model")
        assert model.headers["x-model-sha256"] == versions[3]["model_digest"]

        types = [p["type"] for p in pushed]
        assert types.count("round_completed") == 3
        assert "metric_update" in types and "training_completed" in types

        after = await scrape(http, endpoints)
        for endpoint, text in after.items():
            assert "fl_" in text and "process_cpu_seconds_total" in text, endpoint

        assert service_total(before, "coordinator", "fl_rounds_completed_total") == 0
        assert service_total(after, "coordinator", "fl_rounds_completed_total") == 3
        for service, name in MOVING_PER_ROUND:
            seen = [service_total(scraped, service, name) for scraped in [before, *during, after]]
            assert seen == sorted(seen) and seen[-1] >= seen[0] + 3, (name, seen)
            assert any(seen[0] < value < seen[0] + 3 for value in seen), f"{name} never seen mid-training: {seen}"
        assert service_total(after, "coordinator", "fl_update_bytes_received_total") > \
            service_total(before, "coordinator", "fl_update_bytes_received_total")
        assert service_total(after, "versions", "fl_versions_committed_total") == 4


async def test_two_hundred_live_sockets_all_receive_the_round_events(deployment: Deployment, agents) -> None:
    ws_url = deployment.dashboard_url.replace("http", "ws") + "/ws/"
    dashboard = psutil.Process(deployment.health()["services"]["dashboard"][0]["pid"])
    rss_before, cpu_before = dashboard.memory_info().rss, sum(dashboard.cpu_times()[:2])
    sockets = [await websockets.connect(f"{ws_url}watcher-{i}?api_key={deployment.api_key}") for i in range(200)]
    try:
        for socket in sockets:
            await socket.send(json.dumps({"action": "subscribe", "training_id": "*"}))
            assert json.loads(await socket.recv())["type"] == "subscribed"
        async with deployment.client() as http:
            training_id = (await http.post("/api/training/start", json=training_body(2))).json()["training_id"]
            await wait_status(http, training_id, {"completed"})
            health = deployment.health()

        async def rounds_seen(socket: websockets.ClientConnection) -> int:
            seen = 0
            while seen < 2:
                message = json.loads(await asyncio.wait_for(socket.recv(), timeout=20))
                seen += message["type"] == "round_completed"
            return seen

        assert await asyncio.gather(*(rounds_seen(s) for s in sockets)) == [2] * 200
        assert health["services"]["dashboard"][0]["pid"] == dashboard.pid
        # Cheap: 200 subscribed sockets through a 2-round training cost the dashboard little memory
        # and CPU (measured +18.5 MB and 1.1-1.5 s of CPU on the 2-core machine; the bounds leave room).
        rss_growth_mb = (dashboard.memory_info().rss - rss_before) / 2**20
        cpu_s = sum(dashboard.cpu_times()[:2]) - cpu_before
        print(f"dashboard with 200 sockets: +{rss_growth_mb:.1f} MB RSS, {cpu_s:.2f} s CPU")
        assert rss_growth_mb < 64, rss_growth_mb
        assert cpu_s < 20, cpu_s
    finally:
        await asyncio.gather(*(s.close() for s in sockets))
