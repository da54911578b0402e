"""One organisation's agents of every kind, for end-to-end runs (``scripts/test-federated-system.py``).

- bus agents: :class:`agents.client.FederatedClient` on their digits shard;
- Flower agents: a Flower ``NumPyClient`` (``agents.flower_digits``) run by :class:`agents.flower.FlowerAgent`,
  when ``flwr`` is importable;
- plain-HTTP clients: ``agents.http_sync.sync_once`` posting each model they train to ``/sync_model``.

Bus and Flower agents join with the project's join token, so they are bound to that project; the
HTTP clients are registered by the dashboard's gateway as ``http-<org>.<project>.<client_id>``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis.asyncio as aioredis

from agents.client import FederatedClient
from agents.data import ClientData
from agents.flower import FlowerAgent
from agents.http_sync import SyncFailed, SyncSettings, sync_once
from agents.shared_models import SharedModels
from federated_learning.bus.connection import connect
from federated_learning.presets import create_trainer
from federated_learning.protocol.tensors import decode_layers, encode_layers

log = logging.getLogger(__name__)

DATASET = "digits"
NUM_FEATURES = 64
NUM_CLASSES = 10
POLL_S = 0.2
SYNC_RETRY_S = 0.2
MAX_MODEL_BYTES = 1 << 26
TERMINAL = frozenset({"completed", "failed", "stopped"})


def flower_available() -> bool:
    """Whether Flower (``flwr``) can be imported here."""
    return importlib.util.find_spec("flwr") is not None


@dataclass(frozen=True)
class Membership:
    """Where an organisation's agents belong and what they present."""

    org_id: str
    project_id: str
    join_token: str
    operator_key: str
    """The key the HTTP clients sync (and read their training's status) with."""


@dataclass(frozen=True)
class Endpoints:
    """How agents reach the deployment."""

    redis_url: str
    dashboard_url: str
    key_prefix: str = "fl"
    dashboard_verify: ssl.SSLContext | bool = True
    heartbeat_interval_s: float = 0.5


@dataclass
class HttpSyncAgent:
    """A plain-HTTP client: trains each new global version locally and posts it with ``sync_once``."""

    client_id: str
    data: ClientData
    membership: Membership
    endpoints: Endpoints
    workdir: Path
    history: list[str] = field(default_factory=list)
    """One line per sync attempt: the version it trained from and how it ended."""
    seen: list[str] = field(default_factory=list)
    """The training's status/phase, round and version, each time it changed."""

    @property
    def agent_id(self) -> str:
        """The volunteer id the gateway registers it under (outside the default project)."""
        return f"http-{self.membership.org_id}.{self.membership.project_id}.{self.client_id}"

    def settings(self, training_id: str) -> SyncSettings:
        return SyncSettings(
            enabled=True, server_url=self.endpoints.dashboard_url.rstrip("/"), client_id=self.client_id,
            local_model_path=self.workdir / f"{self.client_id}.safetensors",
            merged_model_path=self.workdir / f"{self.client_id}-merged.safetensors",
            sync_hour=0, sync_minute=0, api_key=self.membership.operator_key, training_id=training_id,
            num_examples=len(self.data.train))

    def follow(self, training_id: str, stop: threading.Event) -> None:
        """Until the training ends (or ``stop``): each new version is trained on and posted once,
        as an update of that version (``X-Base-Version``)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        last: int | None = None
        with httpx.Client(base_url=self.endpoints.dashboard_url, verify=self.endpoints.dashboard_verify,
                          headers={"X-API-Key": self.membership.operator_key}, timeout=30.0) as http:
            while not stop.is_set():
                status = self._status(http, training_id)
                if status is not None and status["status"] in TERMINAL:
                    return
                if status is not None:
                    self._note(status)
                if status is not None and self._due(status, last):
                    last = int(status["current_version"])
                    self._sync(http, training_id, last, status["config"]["local"])
                stop.wait(POLL_S)

    def _note(self, status: dict[str, Any]) -> None:
        seen = f"{status['status']}/{status['phase']} r{status['round']} v{status.get('current_version')}"
        if not self.seen or self.seen[-1] != seen:
            self.seen.append(seen)

    def _due(self, status: dict[str, Any], last: int | None) -> bool:
        """A new version while a round collects; or, before its first sync, while the training runs
        or waits for agents: that sync registers the client, and rounds then wait for it (a round
        that closes before it is registered does not)."""
        version = status.get("current_version")
        if version is None or version == last:
            return False
        if not self.history:
            return str(status["status"]) in ("running", "paused")
        return bool(status["status"] == "running" and status["phase"] == "collecting")

    def _status(self, http: httpx.Client, training_id: str) -> dict[str, Any] | None:
        response = http.get(f"/api/training/{training_id}/status")
        if response.status_code != 200:
            return None
        status: dict[str, Any] = response.json()
        return status

    def _sync(self, http: httpx.Client, training_id: str, version: int, local: dict[str, Any]) -> None:
        model = http.get(f"/api/training/{training_id}/versions/{version}/model")
        if model.status_code != 200:
            self.history.append(f"v{version}: model download answered {model.status_code}")
            return
        settings = self.settings(training_id)
        settings.local_model_path.write_bytes(self._train(model.content, local, version))
        with httpx.Client(verify=self.endpoints.dashboard_verify, timeout=30.0,
                          headers={"X-Base-Version": str(version)}) as sync_client:
            try:
                sync_once(settings, sync_client, sleep=lambda _s: time.sleep(SYNC_RETRY_S))
                self.history.append(f"v{version}: synced at {time.time():.2f}")
            except SyncFailed as exc:
                self.history.append(f"v{version}: {exc}")

    def _train(self, model: bytes, local: dict[str, Any], version: int) -> bytes:
        trainer = create_trainer("softmax", num_features=NUM_FEATURES, num_classes=NUM_CLASSES)
        received = decode_layers(model, max_bytes=MAX_MODEL_BYTES)
        weights, _result = trainer.train(
            {name: np.asarray(layer, dtype=np.float32) for name, layer in received.items()},
            self.data.train.x, self.data.train.y, epochs=int(local["epochs"]),
            batch_size=int(local["batch_size"]), learning_rate=float(local["learning_rate"]), seed=version)
        return encode_layers({name: np.asarray(weights[name], dtype=received[name].dtype) for name in received})


class OrgFleet:
    """An organisation's bus, Flower and HTTP agents over its shards of the data."""

    def __init__(self, membership: Membership, endpoints: Endpoints, shards: list[ClientData], *,
                 flower: bool, workdir: Path) -> None:
        """The last shard goes to an HTTP client, the one before it to a Flower agent (when
        ``flower``), the rest to bus agents; at least one bus agent is needed."""
        if len(shards) < 2 + flower:
            raise ValueError(f"an organisation needs at least {2 + flower} shards; got {len(shards)}")
        self.membership = membership
        self.endpoints = endpoints
        org = membership.org_id
        self.http = HttpSyncAgent(f"{org}-http-0", shards[-1], membership, endpoints, workdir / org)
        self.flower_shard = shards[-2] if flower else None
        self.bus_shards = shards[:-2] if flower else shards[:-1]
        self.agents: list[FederatedClient] = []
        self._redis: aioredis.Redis | None = None
        self._stop = threading.Event()
        self._http_thread: threading.Thread | None = None

    @property
    def ids_by_kind(self) -> dict[str, list[str]]:
        """The agent ids of each kind: ``bus``, ``flower`` (possibly empty) and ``http``."""
        org = self.membership.org_id
        return {"bus": [f"{org}-bus-{i}" for i in range(len(self.bus_shards))],
                "flower": [f"{org}-flower-0"] if self.flower_shard is not None else [],
                "http": [self.http.agent_id]}

    @property
    def inbox_agents(self) -> int:
        """Agents the coordinator can select (bus and Flower)."""
        return len(self.bus_shards) + (self.flower_shard is not None)

    async def start(self) -> None:
        """Connect, build the bus and Flower agents, and join them all."""
        self._redis = await connect(self.endpoints.redis_url)
        common: dict[str, Any] = {"redis": self._redis, "key_prefix": self.endpoints.key_prefix,
                                      "heartbeat_interval_s": self.endpoints.heartbeat_interval_s,
                                      "join_token": self.membership.join_token,
                                      "shared_models": SharedModels()}
        for agent_id, shard in zip(self.ids_by_kind["bus"], self.bus_shards, strict=True):
            agent = FederatedClient(agent_id, seed=shard.client_id, **common)
            agent.add_dataset(DATASET, shard.train.x, shard.train.y, x_eval=shard.eval.x, y_eval=shard.eval.y)
            self.agents.append(agent)
        if self.flower_shard is not None:
            self.agents.append(self._flower_agent(self.flower_shard, common))
        await asyncio.gather(*(agent.initialize() for agent in self.agents))

    def _flower_agent(self, shard: ClientData, common: dict[str, Any]) -> FlowerAgent:
        from agents.flower_digits import DigitsNumPyClient

        client = DigitsNumPyClient(shard.train.x, shard.train.y, shard.eval.x, shard.eval.y)
        return FlowerAgent(self.ids_by_kind["flower"][0], client, dataset=DATASET,
                           num_examples=len(shard.train), **common)

    def follow_over_http(self, training_id: str) -> None:
        """Start the HTTP client on ``training_id`` in its own thread (not the default executor,
        which the bus agents' training keeps busy)."""
        self._http_thread = threading.Thread(target=self.http.follow, args=(training_id, self._stop),
                                             name=f"http-sync-{self.membership.org_id}", daemon=True)
        self._http_thread.start()

    async def http_registered(self, timeout_s: float) -> bool:
        """Wait until the HTTP client has synced once (and so is registered); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while not self.http.history and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        return bool(self.http.history)

    async def stop(self) -> None:
        """Stop the HTTP client, make every agent leave, close the shared connection."""
        self._stop.set()
        if self._http_thread is not None:
            await asyncio.to_thread(self._http_thread.join)
        await asyncio.gather(*(agent.close() for agent in self.agents), return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
        self.agents, self._redis = [], None
