"""Simulated agents on the digits data against a running deployment.

Each agent is a real :class:`FederatedClient` with its own identity and inbox; they
share this process (asyncio) and one connection pool. The training is started over
REST like any user would, and the final model is downloaded over REST and scored on
a global test set that no agent holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from agents.attacks import Attack, flip_labels
from agents.client import FederatedClient
from agents.data import Dataset, make_client_datasets
from agents.shared_models import SharedModels
from federated_learning.bus.connection import RedisTls, connect, with_credentials
from federated_learning.deploy.acl import agent_user_name, stored_password
from federated_learning.presets import create_trainer
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.tensors import decode_layers

log = logging.getLogger(__name__)

DATASET = "digits"
NUM_FEATURES = 64
NUM_CLASSES = 10
POLL_S = 0.5


@dataclass(frozen=True)
class SimulationOptions:
    redis_url: str
    dashboard_url: str
    api_key: str = ""
    key_prefix: str = "fl"
    clients: int = 69
    rounds: int = 20
    partition: str = "dirichlet:0.5"
    seed: int = 0
    clients_per_round: int = 20
    min_clients: int | None = None
    algorithm: str = "fedavg"
    algorithm_params: dict[str, float | int | str] = field(default_factory=dict)
    trainer: str = "softmax"
    # Tuned with scripts/tune-demo.py on 69 agents, Dirichlet 0.5 (see docs/demo.md).
    local_epochs: int = 10
    batch_size: int = 4
    learning_rate: float = 1.0
    proximal_mu: float = 0.0
    compression: str = "none"
    compression_fraction: float = 0.1
    privacy_level: str = "none"
    privacy_mode: str = "central"
    noise_mechanism: str = "gaussian"
    secure_aggregation: bool = False
    clip_norm: float | None = None
    adaptive_clip_quantile: float | None = None
    """Adaptive clipping towards this quantile of the update norms; None: a fixed clip norm."""
    malicious_fraction: float = 0.0
    attack: str = "sign_flip"
    heartbeat_interval_s: float = 5.0
    state_dir: Path | None = None
    """Where agents keep their keys; reuse it so agents keep their identity across runs."""
    credentials_dir: Path | None = None
    """Redis ACL mode: the deployment's ``secrets/redis-acl``; each agent then logs in as its
    own ACL user (and has its own connection) instead of sharing ``redis_url``'s."""
    redis_tls: RedisTls | None = None
    dashboard_ca_file: Path | None = None
    """The CA that signed an https dashboard's certificate (default: the system's CAs)."""
    round_deadline_s: float = 60.0
    timeout_s: float = 900.0
    connect_attempts: int = 20
    """Tries to reach the bus at start, with backoff from 0.1 s doubling up to 5 s."""


@dataclass
class SimulationReport:
    training_id: str
    status: str
    reason: str
    rounds: list[dict[str, Any]]
    final_version: int | None
    final_test_accuracy: float | None
    final_federated_accuracy: float | None
    seconds: float
    options: dict[str, Any]

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1, default=str))


def training_request(options: SimulationOptions) -> dict[str, Any]:
    """The REST body of ``POST /api/training/start`` for these options."""
    return {
        "name": f"digits-{options.algorithm}-{options.partition}",
        "dataset": DATASET,
        "model": {"trainer": options.trainer, "num_features": NUM_FEATURES,
                  "num_classes": NUM_CLASSES, "seed": options.seed},
        "algorithm": options.algorithm,
        "algorithm_params": options.algorithm_params,
        "rounds": options.rounds,
        "clients_per_round": options.clients_per_round,
        "min_clients": options.min_clients,
        "round_deadline_s": options.round_deadline_s,
        "local": {"epochs": options.local_epochs, "batch_size": options.batch_size,
                  "learning_rate": options.learning_rate, "proximal_mu": options.proximal_mu,
                  "compression": options.compression, "compression_fraction": options.compression_fraction,
                  "clip_norm": options.clip_norm},
        "privacy_level": options.privacy_level,
        "privacy_mode": options.privacy_mode,
        "noise_mechanism": options.noise_mechanism,
        "secure_aggregation": options.secure_aggregation,
        "adaptive_clipping": None if options.adaptive_clip_quantile is None
        else {"target_quantile": options.adaptive_clip_quantile},
    }


def test_accuracy(model_bytes: bytes, options: SimulationOptions, test: Dataset) -> float:
    trainer = create_trainer(options.trainer, num_features=NUM_FEATURES, num_classes=NUM_CLASSES)
    weights = decode_layers(model_bytes, max_bytes=1 << 30)
    return float(trainer.evaluate({k: v.astype(np.float32) for k, v in weights.items()},
                                  test.x, test.y).accuracy)


def agent_id(client_id: int) -> str:
    """The id of simulated agent ``client_id``."""
    return f"agent-{client_id:03d}"


def simulated_agent_ids(clients: int) -> list[str]:
    """The ids a simulation of ``clients`` agents uses (to provision their ACL users)."""
    return [agent_id(client_id) for client_id in range(clients)]


def agent_redis_url(options: SimulationOptions, agent: str) -> str:
    """``redis_url`` logged in as the agent's own ACL user (its password from the secrets)."""
    assert options.credentials_dir is not None
    user = agent_user_name(Keys(options.key_prefix), agent)
    password = stored_password(options.credentials_dir, user)
    return with_credentials(options.redis_url, user, password)


def dashboard_verify(options: SimulationOptions) -> ssl.SSLContext | bool:
    if options.dashboard_ca_file is None:
        return True
    return ssl.create_default_context(cafile=str(options.dashboard_ca_file))


async def start_agents(options: SimulationOptions) -> tuple[list[FederatedClient], Dataset]:
    clients_data, test = make_client_datasets(options.clients, options.partition, options.seed)
    shared = (None if options.credentials_dir is not None
              else await connect(options.redis_url, tls=options.redis_tls,
                                 attempts=options.connect_attempts))
    malicious = malicious_ids(options.clients, options.malicious_fraction, options.seed)
    attack = Attack(options.attack)
    agents = []
    shared_models = SharedModels()  # the simulated agents read each model once
    for data in clients_data:
        bad = data.client_id in malicious
        name = agent_id(data.client_id)
        own_url = agent_redis_url(options, name) if shared is None else None
        agent = FederatedClient(name, redis=shared, redis_url=own_url, redis_tls=options.redis_tls,
                                key_prefix=options.key_prefix,
                                heartbeat_interval_s=options.heartbeat_interval_s, seed=options.seed,
                                state_dir=options.state_dir, shared_models=shared_models,
                                attack=attack if bad and attack is not Attack.LABEL_FLIP else None)
        y_train = flip_labels(data.train.y, NUM_CLASSES) if bad and attack is Attack.LABEL_FLIP else data.train.y
        agent.add_dataset(DATASET, data.train.x, y_train, x_eval=data.eval.x, y_eval=data.eval.y)
        agents.append(agent)
    await asyncio.gather(*(agent.initialize() for agent in agents))
    return agents, test


def malicious_ids(num_clients: int, fraction: float, seed: int) -> set[int]:
    """Which simulated agents attack: ``round(fraction * num_clients)`` of them, fixed by ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"malicious fraction must be in [0, 1); got {fraction}")
    count = round(fraction * num_clients)
    return set(np.random.default_rng(seed + 7919).choice(num_clients, size=count, replace=False).tolist())


async def stop_agents(agents: list[FederatedClient]) -> None:
    """Close the agents; then the connection they share, when they share one."""
    await asyncio.gather(*(agent.close() for agent in agents))
    if agents and not agents[0].owns_connection:
        await agents[0].redis.aclose()


async def run_simulation(options: SimulationOptions,
                         on_round: Callable[[dict[str, Any]], None] | None = None) -> SimulationReport:
    """Start agents, start a training over REST, follow it to the end, score the final model."""
    started = time.monotonic()
    agents, test = await start_agents(options)
    try:
        async with httpx.AsyncClient(base_url=options.dashboard_url, timeout=30.0,
                                     headers={"X-API-Key": options.api_key},
                                     verify=dashboard_verify(options)) as http:
            response = await http.post("/api/training/start", json=training_request(options))
            response.raise_for_status()
            training_id = response.json()["training_id"]
            status, rounds = await _follow(http, training_id, options, on_round)
            final_version = status.get("current_version")
            accuracy = None
            if final_version is not None:
                model = await http.get(f"/api/training/{training_id}/versions/{final_version}/model")
                model.raise_for_status()
                accuracy = test_accuracy(model.content, options, test)
    finally:
        await stop_agents(agents)
    final_eval = status.get("final_evaluation") or {}
    return SimulationReport(
        training_id=training_id, status=status["status"], reason=status.get("reason", ""),
        rounds=rounds, final_version=final_version, final_test_accuracy=accuracy,
        final_federated_accuracy=final_eval.get("accuracy"),
        seconds=time.monotonic() - started, options=asdict(options),
    )


async def _follow(http: httpx.AsyncClient, training_id: str, options: SimulationOptions,
                  on_round: Callable[[dict[str, Any]], None] | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    seen = 0
    deadline = time.monotonic() + options.timeout_s
    rounds: list[dict[str, Any]] = []
    while True:
        status_response = await http.get(f"/api/training/{training_id}/status")
        if status_response.status_code == 404:  # the coordinator has not taken the command yet
            await asyncio.sleep(POLL_S)
            continue
        status_response.raise_for_status()
        status = status_response.json()
        metrics = (await http.get(f"/api/training/{training_id}/metrics")).json()
        for row in metrics[seen:]:
            rounds.append(row)
            if on_round is not None:
                on_round(row)
        seen = len(metrics)
        if status["status"] in ("completed", "failed", "stopped"):
            return status, rounds
        if time.monotonic() > deadline:
            raise TimeoutError(f"training {training_id} still {status['status']} after {options.timeout_s}s")
        await asyncio.sleep(POLL_S)
