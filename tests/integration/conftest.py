"""Factories that build services and agents against the session's valkey-server."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agents.client import FederatedClient
from agents.data import make_client_datasets
from federated_learning.config import Settings
from federated_learning.coordination.state import TrainingState
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import StartTraining, TrainingConfig, encode
from federated_learning.services.aggregator import Aggregator
from federated_learning.services.coordinator import CoordinatorService
from federated_learning.services.monitor import Monitor
from federated_learning.services.privacy import PrivacyManager
from federated_learning.services.runtime import ServiceContext
from federated_learning.services.versions import VersionManager

TEST_API_KEY = "test-key-0123456789abcdef"

SERVICES: dict[str, Any] = {
    "coordinator": CoordinatorService, "aggregator": Aggregator, "privacy": PrivacyManager,
    "versions": VersionManager, "monitor": Monitor,
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", metrics_port_base=0, dashboard_port=0, cpu_cores=2,
        heartbeat_interval_s=0.2, heartbeat_timeout_s=1.5, round_deadline_s=10.0,
        min_clients_per_round=2, max_clients_per_round=10, claim_idle_ms=500,
        default_privacy_level="none", max_blob_bytes=1 << 20, api_key=TEST_API_KEY,
    )


class System:
    """Pipeline services running as tasks in this event loop, each with its own client."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        self.keys = Keys(settings.redis_key_prefix)
        self.contexts: dict[str, ServiceContext] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self, *names: str) -> None:
        """Start services by name; ``name:instance`` starts another instance (``name`` is instance 0)."""
        for name in names or tuple(SERVICES):
            service, _, instance = name.partition(":")
            client = aioredis.Redis.from_url(self.url)
            ctx = ServiceContext(redis=client, settings=self.settings, service=service, instance=instance or "0")
            self.contexts[name] = ctx
            self.tasks[name] = asyncio.create_task(SERVICES[service](ctx).run())

    async def stop(self, *names: str) -> None:
        for name in names or tuple(self.tasks):
            ctx = self.contexts.pop(name)
            ctx.stop.set()
            await self.tasks.pop(name)
            await ctx.redis.aclose()

    async def kill(self, name: str) -> None:
        """Cancel a service mid-flight (no clean shutdown), as a crash would."""
        task = self.tasks.pop(name)
        ctx = self.contexts.pop(name)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        if not done:  # the cancellation landed inside a client retry: make the loop end anyway
            ctx.stop.set()
            task.cancel()
            await asyncio.wait({task}, timeout=10)
        await ctx.redis.aclose()


@pytest.fixture
async def system(redis: aioredis.Redis, redis_url: str, settings: Settings) -> AsyncIterator[System]:
    running = System(redis_url, settings)
    yield running
    await running.stop()


@pytest.fixture
async def make_agents(redis_url: str, settings: Settings) -> AsyncIterator[Callable[..., Awaitable[list[FederatedClient]]]]:
    started: list[FederatedClient] = []

    async def make(count: int, *, partition: str = "iid", seed: int = 0) -> list[FederatedClient]:
        clients, _test = make_client_datasets(count, partition, seed)
        agents = []
        for data in clients:
            agent = FederatedClient(f"agent-{data.client_id:03d}", redis_url=redis_url,
                                    heartbeat_interval_s=settings.heartbeat_interval_s, seed=seed)
            agent.add_dataset("digits", data.train.x, data.train.y, x_eval=data.eval.x, y_eval=data.eval.y)
            agents.append(agent)
        await asyncio.gather(*(a.initialize() for a in agents))
        started.extend(agents)
        return agents

    yield make
    await asyncio.gather(*(a.close() for a in started), return_exceptions=True)


def digits_config(**overrides: Any) -> TrainingConfig:
    body: dict[str, Any] = {
        "name": "digits", "dataset": "digits",
        "model": {"trainer": "softmax", "num_features": 64, "num_classes": 10},
        "rounds": 3, "clients_per_round": 4, "min_clients": 2,
        "local": {"epochs": 2, "batch_size": 8, "learning_rate": 0.1},
        "privacy_level": "none",
    }
    body.update(overrides)
    return TrainingConfig.model_validate(body)


async def start_training(redis: aioredis.Redis, training_id: str, config: TrainingConfig) -> None:
    await redis.xadd(Keys().control_stream, encode(StartTraining(training_id=training_id, config=config)))  # type: ignore[arg-type]


async def wait_until(condition: Callable[[], Awaitable[object] | object], what: str,
                     timeout_s: float = 30.0) -> None:
    """Poll ``condition`` (a function, or a coroutine function) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not await _holds(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(0.02)


async def _holds(condition: Callable[[], Awaitable[object] | object]) -> bool:
    value = condition()
    return bool(await value if inspect.isawaitable(value) else value)


async def wait_for_status(redis: aioredis.Redis, training_id: str, statuses: set[str],
                          timeout_s: float = 60.0) -> TrainingState:
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        raw = await redis.get(Keys().training(training_id))
        if raw is not None:
            state = TrainingState.model_validate_json(raw)
            if state.status.value in statuses:
                return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"training {training_id} not in {statuses} after {timeout_s}s: "
                         f"{state.status if state else 'missing'} {state.reason if state else ''}")
