"""A clean run raises no alert and rejects no input: an honest non-IID training with over-selection,
where the over-selected agents that answer after their round closed are counted as late; and the
finished training leaves the per-training gauges."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from agents.client import FederatedClient
from federated_learning.bus.replies import text
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.dashboard.main import create_app
from federated_learning.protocol.events import Event
from federated_learning.protocol.keys import GROUP_COORDINATOR, GROUP_MONITOR, Keys
from federated_learning.protocol.messages import MalformedMessage, Task, decode
from federated_learning.records.trainings import TrainingStore
from federated_learning.services.monitor import Monitor
from federated_learning.services.runtime import (
    ServiceContext,
    labelled_trainings,
    prune_finished_trainings,
)
from tests.integration.conftest import (
    TEST_API_KEY,
    System,
    digits_config,
    start_training,
    wait_for_status,
)

KEYS = Keys()
AGENTS = 24
STRAGGLERS = 2
"""Agents that answer each task only once its round has closed: over-selection (12 asked for 10
updates) leaves room for them, so every round they are asked in has late updates."""


@pytest.fixture
async def http(redis: aioredis.Redis, settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    ctx = ServiceContext(redis=redis, settings=settings, service="dashboard", instance="0")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://test",
                                 headers={"X-API-Key": TEST_API_KEY}) as client:
        yield client


async def metric_totals(http: httpx.AsyncClient) -> dict[str, float]:
    """Sum of each sample name's values on the dashboard's /metrics (what Prometheus scrapes)."""
    response = await http.get("/metrics")
    response.raise_for_status()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def round_closed(redis: aioredis.Redis, training_id: str, round_number: int) -> None:
    """Wait until the training has left ``round_number``'s collecting phase."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        raw = await redis.get(KEYS.training(training_id))
        assert raw is not None
        state = TrainingState.model_validate_json(raw)
        if state.round > round_number or state.phase is not RoundPhase.COLLECTING or state.status.is_final:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"round {round_number} of {training_id} still collecting after 60s")


def straggle(agent: FederatedClient, redis: aioredis.Redis) -> None:
    """Make ``agent`` answer each task just after its round closed, as a slow over-selected agent does."""
    handle = agent.handle_task

    async def late(fields: dict[bytes, bytes]) -> None:
        try:
            task = decode(Task, fields)
        except MalformedMessage:
            task = None
        if task is not None:
            await round_closed(redis, task.training_id, task.round)
        await handle(fields)

    agent.handle_task = late  # type: ignore[method-assign]


async def start_monitor(system: System) -> None:
    """The monitor, as a service of ``system``. In-process services write no health keys, so it
    is given no end to its start-up grace: service liveness is not what this run is about."""
    ctx = ServiceContext(redis=aioredis.Redis.from_url(system.url), settings=system.settings,
                         service="monitor", instance="0")
    system.contexts["monitor"] = ctx
    system.tasks["monitor"] = asyncio.create_task(Monitor(ctx, startup_grace_s=math.inf).run())


async def events_of(redis: aioredis.Redis, kind: str) -> list[dict[str, Any]]:
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(KEYS.event_stream)  # type: ignore[assignment]
    events = [decode(Event, fields) for _id, fields in entries]
    return [e.model_dump(mode="json") for e in events if e.kind == kind]


async def test_a_clean_non_iid_run_raises_no_alert_rejects_nothing_and_counts_late_updates(
        redis: aioredis.Redis, system: System, make_agents: Any, http: httpx.AsyncClient) -> None:
    await system.start("coordinator", "aggregator", "privacy", "versions")
    await start_monitor(system)
    agents = await make_agents(AGENTS, partition="dirichlet:0.5", seed=0)
    for agent in agents[:STRAGGLERS]:
        straggle(agent, redis)
    before = await metric_totals(http)
    config = digits_config(rounds=3, clients_per_round=10, min_clients=5, over_selection=1.2,
                           local={"epochs": 10, "batch_size": 4, "learning_rate": 1.0})

    await start_training(redis, "clean", config)
    probe = Gauge("probe_accuracy", "-", ["training"], registry=CollectorRegistry())
    probe.labels("clean").set(0.5)
    await wait_for_status(redis, "clean", {"running"})
    assert await prune_finished_trainings(TrainingStore(redis, KEYS), [probe]) == set()
    state = await wait_for_status(redis, "clean", {"completed", "failed"}, timeout_s=120)

    assert state.status == "completed", state.reason
    rounds = await events_of(redis, "round_completed")
    assert len(rounds) == 3 and all(e["data"]["update_norm_mean"] for e in rounds), "every round's updates were scored"
    late_events = await _wait_for_late_events(redis, http, before)
    assert late_events, "the stragglers' updates came after their rounds closed"
    assert all(e["severity"] == "info" and e["agent_id"] for e in late_events)
    after = await metric_totals(http)
    assert after.get("fl_late_updates_total", 0.0) - before.get("fl_late_updates_total", 0.0) == len(late_events)
    assert after.get("fl_rejected_inputs_total", 0.0) == before.get("fl_rejected_inputs_total", 0.0)
    assert await redis.hgetall(KEYS.rejections) == {}
    assert await events_of(redis, "input_rejected") == []
    stats = {text(k): int(v) for k, v in (await redis.hgetall(KEYS.agent_stats)).items()}
    late_trainings = [e for e in late_events if e["message"].startswith("train")]
    assert sum(v for k, v in stats.items() if k.endswith(":late")) == len(late_trainings)
    # committed rounds' uploads are deleted at commit, late ones when they are counted
    assert [key async for key in redis.scan_iter(match=KEYS.upload_pattern())] == []
    await _monitor_caught_up(redis)
    assert (await http.get("/api/alerts")).json() == []
    assert await events_of(redis, "update_anomaly") == []
    assert (await metric_totals(http)).get("fl_alerts_open", 0.0) == 0.0
    assert 'fl_training_accuracy{training="clean"}' not in (await http.get("/metrics")).text
    assert await prune_finished_trainings(TrainingStore(redis, KEYS), [probe]) == {"clean"}
    assert labelled_trainings([probe]) == set()


async def _wait_for_late_events(redis: aioredis.Redis, http: httpx.AsyncClient,
                                before: dict[str, float]) -> list[dict[str, Any]]:
    """The late_update events, once the coordinator has counted every one it emitted (the last
    straggler may answer after the training completed)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = await events_of(redis, "late_update")
        counted = (await metric_totals(http)).get("fl_late_updates_total", 0.0) - before.get("fl_late_updates_total", 0.0)
        pending = await redis.xpending(KEYS.update_stream, GROUP_COORDINATOR)
        if events and counted == len(events) and pending["pending"] == 0:
            return events
        await asyncio.sleep(0.05)
    return await events_of(redis, "late_update")


async def _monitor_caught_up(redis: aioredis.Redis) -> None:
    """Wait until the monitor has handled every event written so far."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        [group] = [g for g in await redis.xinfo_groups(KEYS.event_stream) if g["name"] == GROUP_MONITOR.encode()]
        newest: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrevrange(  # type: ignore[assignment]
            KEYS.event_stream, count=1)
        last = newest[0][0]
        if group["pending"] == 0 and group["last-delivered-id"] == last:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the monitor did not catch up with the event stream in 30s")
