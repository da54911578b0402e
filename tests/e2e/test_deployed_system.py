"""The whole system as separate processes: training, metrics endpoints, WebSocket."""

from __future__ import annotations

import asyncio
import json

import websockets

from tests.e2e.conftest import Deployment, training_body, wait_status


async def test_ten_agents_train_three_rounds_through_the_deployed_processes(deployment: Deployment, agents) -> None:
    ws_url = deployment.dashboard_url.replace("http", "ws") + f"/ws/e2e-test?api_key={deployment.api_key}"
    async with websockets.connect(ws_url) as socket, deployment.client() as http:
        await socket.send(json.dumps({"action": "subscribe", "training_id": "*"}))
        assert json.loads(await socket.recv())["type"] == "subscribed"
        response = await http.post("/api/training/start", json=training_body(3))
        assert response.status_code == 202
        training_id = response.json()["training_id"]

        pushed: list[dict] = []
        async def collect() -> None:
            while True:
                pushed.append(json.loads(await socket.recv()))
        collector = asyncio.create_task(collect())
        status = await wait_status(http, training_id, {"completed", "failed"})
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

        scraped = {}
        for service, records in deployment.health()["services"].items():
            port = records[0]["metrics_port"]
            scraped[service] = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            assert "fl_" in scraped[service] and "process_cpu_seconds_total" in scraped[service], service

        def sample(service: str, name: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in scraped[service].splitlines()
                       if line.startswith(name) and not line.startswith("#"))

        assert sample("coordinator", "fl_rounds_completed_total") == 3
        assert sample("coordinator", "fl_round_seconds_count") == 3
        assert sample("coordinator", "fl_update_bytes_received_total") > 0
        assert sample("aggregator", "fl_aggregation_seconds_count") >= 3
        assert sample("versions", "fl_versions_committed_total") == 4


async def test_two_hundred_live_sockets_all_receive_the_round_events(deployment: Deployment, agents) -> None:
    ws_url = deployment.dashboard_url.replace("http", "ws") + "/ws/"
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
        assert health["services"]["dashboard"][0]["pid"]
    finally:
        await asyncio.gather(*(s.close() for s in sockets))
