"""The monitor against the real server: dead-service alerts raised and resolved, metrics recorded."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from federated_learning.monitoring.alerts import EXPECTED_SERVICES, Alert
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import Event, encode
from federated_learning.services.monitor import Monitor
from federated_learning.services.runtime import ServiceContext

KEYS = Keys()


async def open_alerts(redis: aioredis.Redis) -> list[Alert]:
    alerts = [Alert.model_validate_json(v) for v in (await redis.hgetall(KEYS.alerts)).values()]
    return [a for a in alerts if a.is_open]


async def test_dead_service_raises_an_alert_that_resolves_when_it_returns(redis: aioredis.Redis, settings) -> None:
    monitor = Monitor(ServiceContext(redis=redis, settings=settings, service="monitor", instance="0"),
                      startup_grace_s=0)
    await monitor.check()
    assert sorted(a.rule + ":" + a.key.split(":")[1] for a in await open_alerts(redis)) == \
        sorted(f"service_down:{s}" for s in EXPECTED_SERVICES)
    for service in EXPECTED_SERVICES:
        await redis.set(KEYS.service_health(service, "0"), json.dumps({"service": service}), ex=10)
    monitor._last_check = 0.0
    await monitor.check()
    assert await open_alerts(redis) == []
    kinds = [json.loads(f[b"m"])["kind"] for _id, f in await redis.xrange(KEYS.event_stream)]
    assert kinds.count("alert") == len(EXPECTED_SERVICES)
    assert kinds.count("alert_resolved") == len(EXPECTED_SERVICES)


async def test_round_metrics_and_dropouts_are_recorded(redis: aioredis.Redis, settings) -> None:
    ctx = ServiceContext(redis=redis, settings=settings, service="monitor", instance="0")
    for event in (
        Event(kind="round_completed", source="coordinator", training_id="t", round=1,
              data={"eval_accuracy": 0.5, "eval_loss": 1.0, "round_seconds": 0.2, "participants": 4,
                    "epsilon_spent": 0.0}),
        Event(kind="agent_dropped", source="coordinator", training_id="t", round=1, agent_id="a1"),
    ):
        await redis.xadd(KEYS.event_stream, encode(event))  # type: ignore[arg-type]
    await Monitor(ctx).consumer.run(asyncio.Event(), burst=True)
    series = [json.loads(m) for m in await redis.lrange(KEYS.metric_series("t"), 0, -1)]
    assert {m["metric_type"]: m["value"] for m in series} == {
        "accuracy": 0.5, "loss": 1.0, "round_time": 0.2, "participation": 4.0, "epsilon_spent": 0.0}
    assert await redis.hget(KEYS.agent_dropouts, "a1") == b"1"


async def test_privacy_budget_alerts_at_80_and_100_percent(redis: aioredis.Redis, settings) -> None:
    ctx = ServiceContext(redis=redis, settings=settings, service="monitor", instance="0")
    for spent in (1.0, 6.5, 8.0):  # level "low" targets epsilon 8
        event = Event(kind="model_released", source="privacy", training_id="t", round=1,
                      data={"level": "low", "epsilon_spent": spent})
        await redis.xadd(KEYS.event_stream, encode(event))  # type: ignore[arg-type]
    await Monitor(ctx).consumer.run(asyncio.Event(), burst=True)
    alerts = await open_alerts(redis)
    assert sorted(a.severity.value for a in alerts) == ["critical", "warning"]
    assert all(a.rule.startswith("privacy_budget") and a.training_id == "t" for a in alerts)
