"""Five plain-HTTP clients (``agents.http_sync``) and ten bus agents train one model together,
through a deployed system's dashboard over a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import save_file

from agents.data import make_client_datasets
from agents.http_sync import SyncSettings, read_merged_version, sync_once
from federated_learning.presets import create_trainer
from federated_learning.protocol.messages import Task, decode
from federated_learning.protocol.secure_messages import message_type
from federated_learning.protocol.tensors import decode_layers
from tests.e2e.conftest import ROOT, Deployment, training_body, wait_status

HTTP_CLIENTS = 5


def train_locally(folder: Path, model: dict[str, np.ndarray], client: int) -> None:
    """What a bot does between syncs: train on its own data, save a standard safetensors file
    (layers in whatever order) and its metrics beside it."""
    [data], _ = make_client_datasets(1, "iid", seed=100 + client)
    trainer = create_trainer("softmax", num_features=64, num_classes=10)
    weights, result = trainer.train(model, data.train.x, data.train.y, epochs=2, batch_size=8,
                                    learning_rate=0.1, seed=client)
    save_file({name: np.ascontiguousarray(layer) for name, layer in sorted(weights.items(), reverse=True)},
              str(folder / "model.safetensors"))
    (folder / "model.safetensors.metrics.json").write_text(json.dumps(
        {"accuracy": float(result.accuracy), "loss": float(result.loss), "num_examples": int(data.train.y.size)}))


def sync(deployment: Deployment, folder: Path, client: int, training_id: str) -> tuple[str, int]:
    settings = SyncSettings(enabled=True, server_url=deployment.dashboard_url, client_id=f"bot-{client}",
                            local_model_path=folder / "model.safetensors",
                            merged_model_path=folder / "merged.safetensors", sync_hour=3, sync_minute=0,
                            api_key=deployment.api_key, training_id=training_id, num_examples=1)
    with httpx.Client(timeout=30) as http:
        sync_once(settings, http, sleep=lambda _s: None)
    merged = read_merged_version(settings.merged_model_path)
    assert merged is not None
    return merged


def hold_bus_agents_from_round(agents, first_round: int, release: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    """The bus agents answer tasks of ``first_round`` and later only once ``release`` is set, so
    the round stays open while the HTTP clients sync (a bot syncs when it likes)."""
    for agent in agents:
        original = agent.handle_task

        async def gated(fields, *, _original=original) -> None:  # type: ignore[no-untyped-def]
            if message_type(fields) == "task" and decode(Task, fields).round >= first_round:
                await asyncio.wait_for(release.wait(), timeout=60)
            await _original(fields)

        agent.handle_task = gated


async def test_http_clients_and_bus_agents_train_one_model(deployment: Deployment, agents, tmp_path: Path) -> None:
    synced_all = asyncio.Event()
    hold_bus_agents_from_round(agents, 2, synced_all)
    async with deployment.client() as http:
        response = await http.post("/api/training/start", json=training_body(4))
        assert response.status_code == 202
        training_id = response.json()["training_id"]
        await wait_status(http, training_id, {"running"}, min_round=1)
        v0 = decode_layers((await http.get(f"/api/training/{training_id}/versions/0/model")).content,
                           max_bytes=1 << 20)

        async def bot(client: int) -> list[tuple[str, int]]:
            folder = tmp_path / f"bot-{client}"
            folder.mkdir()
            model, merged = dict(v0), []
            for _ in range(2):  # two daily syncs, the second from the merged model of the first
                await asyncio.to_thread(train_locally, folder, model, client)
                merged.append(await asyncio.to_thread(sync, deployment, folder, client, training_id))
                model = decode_layers((folder / "merged.safetensors").read_bytes(), max_bytes=1 << 20)
            return merged

        synced = await asyncio.gather(*(bot(c) for c in range(HTTP_CLIENTS)))
        synced_all.set()
        status = await wait_status(http, training_id, {"completed", "failed"})
        versions = (await http.get(f"/api/training/{training_id}/versions")).json()

    assert status["status"] == "completed", status
    for merged in synced:
        assert all(training == training_id for training, _version in merged)
        assert merged[1][1] >= merged[0][1]  # the second merged model is no older than the first
    contributors = {agent for v in versions for agent in v["contributors"]}
    volunteers = {a for a in contributors if a.startswith("http-")}
    assert volunteers, contributors  # the HTTP clients' updates went into committed versions
    assert any(a.startswith("agent-") for a in contributors)


def run_sync_once(deployment: Deployment, folder: Path, training_id: str, api_key: str) -> subprocess.CompletedProcess[str]:
    """``python -m agents.http_sync --once`` as cron or a systemd timer runs it."""
    env = {**os.environ, "ENABLE_FED_LEARNING": "true", "FED_SERVER_URL": deployment.dashboard_url,
           "FED_CLIENT_ID": "cron-bot", "FED_LOCAL_MODEL_PATH": str(folder / "model.safetensors"),
           "FED_MERGED_MODEL_PATH": str(folder / "merged.safetensors"), "FED_API_KEY": api_key,
           "FED_TRAINING_ID": training_id}
    return subprocess.run([sys.executable, "-m", "agents.http_sync", "--once", "--attempts", "3"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)


async def test_sync_once_writes_the_merged_model_and_exits(deployment: Deployment, agents, tmp_path: Path) -> None:
    synced = asyncio.Event()
    hold_bus_agents_from_round(agents, 2, synced)
    async with deployment.client() as http:
        response = await http.post("/api/training/start", json=training_body(3))
        training_id = response.json()["training_id"]
        await wait_status(http, training_id, {"running"}, min_round=1)
        v0 = decode_layers((await http.get(f"/api/training/{training_id}/versions/0/model")).content,
                           max_bytes=1 << 20)
        await asyncio.to_thread(train_locally, tmp_path, dict(v0), 0)

        refused = await asyncio.to_thread(run_sync_once, deployment, tmp_path, training_id, "not-the-key")
        done = await asyncio.to_thread(run_sync_once, deployment, tmp_path, training_id, deployment.api_key)
        synced.set()
        status = await wait_status(http, training_id, {"completed", "failed"})

    assert refused.returncode == 1
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sync failed: server refused the update (401)"), lines
    assert done.returncode == 0, done.stderr
    merged = read_merged_version(tmp_path / "merged.safetensors")
    assert merged is not None and merged[0] == training_id
    assert status["status"] == "completed", status
    assert decode_layers((tmp_path / "merged.safetensors").read_bytes(), max_bytes=1 << 20).keys() == v0.keys()
