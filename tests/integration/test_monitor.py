"""The monitor against the real server: continuous alerts raised and resolved, metrics recorded."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis

from federated_learning.dashboard.routes.system import system_health
from federated_learning.monitoring.alerts import EXPECTED_SERVICES, Alert
from federated_learning.monitoring.metrics import metrics_from_round
from federated_learning.monitoring.rules import PENDING_BACKLOG_LIMIT
from federated_learning.protocol.events import Event, RoundCompleted
from federated_learning.protocol.keys import GROUP_AGGREGATOR, Keys
from federated_learning.protocol.messages import RoundMetrics, encode
from federated_learning.services.monitor import Monitor
from federated_learning.services.runtime import ServiceContext

KEYS = Keys()


def round_data(**measured: float | None) -> dict[str, object]:
    """A ``round_completed`` event's data: what the test measured, nothing else."""
    empty = {field: None for field, info in RoundCompleted.model_fields.items() if not info.is_required()}
    required = {"version": 1, "attempts": 1, "participants": 0, "selected": 0, "num_examples": 0,
                "train_loss": None, "train_accuracy": None, "eval_loss": None, "eval_accuracy": None,
                "eval_of_version": None, "round_seconds": 0.0, "aggregation_seconds": 0.0, "epsilon_spent": 0.0,
                "completed_at": 0.0}
    return RoundCompleted.model_validate({**empty, "upload_bytes": 0, "dense_bytes": 0, **required,
                                          **measured}).model_dump()


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
              data=round_data(eval_accuracy=0.5, eval_loss=1.0, round_seconds=0.2, participants=4,
                              epsilon_spent=0.0, upload_bytes=4096)),
        Event(kind="agent_dropped", source="coordinator", training_id="t", round=1, agent_id="a1"),
    ):
        await redis.xadd(KEYS.event_stream, encode(event))  # type: ignore[arg-type]
    await Monitor(ctx).consumer.run(asyncio.Event(), burst=True)
    series = [json.loads(m) for m in await redis.lrange(KEYS.metric_series("t"), 0, -1)]
    assert {m["metric_type"]: m["value"] for m in series} == {
        "accuracy": 0.5, "loss": 1.0, "round_time": 0.2, "participation": 4.0, "epsilon_spent": 0.0,
        "bytes_received": 4096.0}
    assert await redis.hget(KEYS.agent_dropouts, "a1") == b"1"


async def test_a_redelivered_event_is_counted_once(redis: aioredis.Redis, settings) -> None:
    """A crash after the effects and before the ack redelivers the event: nothing doubles."""
    monitor = Monitor(ServiceContext(redis=redis, settings=settings, service="monitor", instance="0"))
    completed = Event(kind="round_completed", source="coordinator", training_id="t", round=1,
                      data=round_data(eval_accuracy=0.5, participants=4))
    dropped = Event(kind="agent_dropped", source="coordinator", training_id="t", round=1, agent_id="a1")
    flagged = Event(kind="update_anomaly", source="aggregator", training_id="t", round=1, data={"flags": [
        {"agent_id": "a2", "norm": 9.0, "norm_z": 6.0, "cosine": -0.9, "cosine_z": -6.0,
         "reasons": ["norm"]}]})
    for event in (completed, dropped, flagged):
        entry_id = await redis.xadd(KEYS.event_stream, encode(event))  # type: ignore[arg-type]
        for _delivery in range(3):
            await monitor.on_event(entry_id, encode(event))
    once = metrics_from_round(completed.payload(RoundCompleted), "t", 1)
    assert len(await redis.lrange(KEYS.metric_series("t"), 0, -1)) == len(once)
    assert await redis.hget(KEYS.agent_dropouts, "a1") == b"1"
    assert await redis.hget(KEYS.agent_flags, "a2") == b"1"


async def test_privacy_budget_alerts_at_80_and_100_percent(redis: aioredis.Redis, settings) -> None:
    ctx = ServiceContext(redis=redis, settings=settings, service="monitor", instance="0")
    for spent in (1.0, 6.5, 8.0):  # level "low" targets epsilon 8
        event = Event(kind="model_released", source="privacy", training_id="t", round=1,
                      data={"level": "low", "mechanism": "gaussian", "epsilon_spent": spent})
        await redis.xadd(KEYS.event_stream, encode(event))  # type: ignore[arg-type]
    await Monitor(ctx).consumer.run(asyncio.Event(), burst=True)
    alerts = await open_alerts(redis)
    assert sorted(a.severity.value for a in alerts) == ["critical", "warning"]
    assert all(a.rule.startswith("privacy_budget") and a.training_id == "t" for a in alerts)


async def test_budget_spent_to_within_the_tolerance_or_a_refused_release_is_exhausted(
        redis: aioredis.Redis, settings) -> None:
    for event in (
        Event(kind="model_released", source="privacy", training_id="t", round=3,
              data={"level": "low", "mechanism": "gaussian", "epsilon_spent": 7.99996}),  # calibrated just under epsilon 8
        Event(kind="release_refused", source="privacy", training_id="u", round=4,
              message="privacy budget exhausted: epsilon spent 7.999 of 8.0; one more release would exceed it"),
        Event(kind="release_refused", source="privacy", training_id="u", round=4, message="redelivered"),
    ):
        await redis.xadd(KEYS.event_stream, encode(event))  # type: ignore[arg-type]
    await Monitor(ServiceContext(redis=redis, settings=settings, service="monitor", instance="0")
                  ).consumer.run(asyncio.Event(), burst=True)
    alerts = sorted(await open_alerts(redis), key=lambda a: a.key)
    assert [(a.key, a.severity.value) for a in alerts] == [
        ("privacy_budget_exhausted:t", "critical"), ("privacy_budget_exhausted:u", "critical")]
    assert "release refused: privacy budget exhausted" in alerts[1].message


def completed(round_number: int, accuracy: float, loss: float) -> Event:
    return Event(kind="round_completed", source="coordinator", training_id="t", round=round_number,
                 data=round_data(eval_accuracy=accuracy, eval_loss=loss, participants=4))


async def test_a_metric_jump_against_the_trend_raises_one_alert(redis: aioredis.Redis, settings) -> None:
    monitor = Monitor(ServiceContext(redis=redis, settings=settings, service="monitor", instance="0"))
    accuracies = [0.5 + 0.02 * r for r in range(1, 15)]
    accuracies[10] = 0.1  # round 11
    for round_number, accuracy in enumerate(accuracies, 1):
        await redis.xadd(KEYS.event_stream, encode(completed(round_number, accuracy, 1.0 / round_number)))  # type: ignore[arg-type]
    await monitor.consumer.run(asyncio.Event(), burst=True)
    [alert] = await open_alerts(redis)
    assert (alert.key, alert.rule, alert.training_id) == ("metric_jump:t:accuracy", "metric_jump", "t")
    assert "accuracy 0.1 in round 11" in alert.message and alert.action
    kinds = [json.loads(f[b"m"])["kind"] for _id, f in await redis.xrange(KEYS.event_stream)]
    assert kinds.count("alert") == 1


async def test_a_smooth_series_raises_no_jump_alert(redis: aioredis.Redis, settings) -> None:
    for round_number in range(1, 21):
        accuracy, loss = 0.95 - 0.85 * 0.8**round_number, 2.3 * 0.8**round_number + 0.1
        await redis.xadd(KEYS.event_stream, encode(completed(round_number, accuracy, loss)))  # type: ignore[arg-type]
    await Monitor(ServiceContext(redis=redis, settings=settings, service="monitor", instance="0")
                  ).consumer.run(asyncio.Event(), burst=True)
    assert await open_alerts(redis) == []
    per_round = len(metrics_from_round(completed(1, 0.5, 1.0).payload(RoundCompleted), "t", 1))
    assert len(await redis.lrange(KEYS.metric_series("t"), 0, -1)) == 20 * per_round


def monitor_for(redis: aioredis.Redis, settings) -> Monitor:
    return Monitor(ServiceContext(redis=redis, settings=settings, service="monitor", instance="0"),
                   startup_grace_s=0)


async def write_health(redis: aioredis.Redis, cpu: dict[str, float] | None = None,
                       memory: dict[str, float] | None = None) -> None:
    """A live health record for every expected service; 10% CPU and memory unless given."""
    for service in EXPECTED_SERVICES:
        record = {"service": service, "instance": "0", "at": time.time(),
                  "cpu_percent": (cpu or {}).get(service, 10.0),
                  "memory_percent": (memory or {}).get(service, 10.0)}
        await redis.set(KEYS.service_health(service, "0"), json.dumps(record), ex=10)


async def check_again(monitor: Monitor) -> dict[str, Alert]:
    monitor._last_check = 0.0
    await monitor.check()
    return {a.key: a for a in await open_alerts(redis=monitor.ctx.redis)}


def round_metrics(version: int, accuracy: float) -> str:
    return RoundMetrics(
        training_id="t", round=version + 1, version=version + 1, attempts=1, participants=4,
        selected=4, num_examples=100, train_loss=None, train_accuracy=None, eval_loss=1.0,
        eval_accuracy=accuracy, eval_of_version=version, round_seconds=1.0,
        aggregation_seconds=0.1, epsilon_spent=0.0, completed_at=time.time(),
    ).model_dump_json()


async def test_health_records_carry_process_cpu_and_memory(redis: aioredis.Redis, settings) -> None:
    ctx = ServiceContext(redis=redis, settings=settings, service="aggregator", instance="0")
    await ctx.refresh_health()
    await ctx.refresh_health()
    record = json.loads(await redis.get(KEYS.service_health("aggregator", "0")))
    assert record["cpu_percent"] >= 0.0
    assert record["rss_bytes"] > 0 and 0.0 < record["memory_percent"] < 100.0


async def test_process_cpu_is_reported_as_percent_of_one_core(redis: aioredis.Redis, settings) -> None:
    wall, cpu = time.monotonic(), time.process_time()
    ctx = ServiceContext(redis=redis, settings=settings, service="coordinator", instance="0")
    while time.process_time() - cpu < 0.3:  # one thread busy (as much as the machine's load lets it)
        pass
    one_core = 100.0 * (time.process_time() - cpu) / (time.monotonic() - wall)
    await ctx.refresh_health()
    record = json.loads(await redis.get(KEYS.service_health("coordinator", "0")))
    assert record["cpu_percent"] == pytest.approx(one_core, abs=15.0)


async def test_cpu_and_memory_exhaustion_raise_and_resolve(redis: aioredis.Redis, settings) -> None:
    monitor = monitor_for(redis, settings)
    await write_health(redis, cpu={"aggregator": 99.0}, memory={"coordinator": 95.0})
    opened = await check_again(monitor)
    assert {k: a.severity.value for k, a in opened.items()} == {
        "cpu_exhaustion:aggregator/0": "warning", "memory_exhaustion:coordinator/0": "critical"}
    await write_health(redis)
    assert await check_again(monitor) == {}
    resolved = [json.loads(f[b"m"])["data"]["alert"]["rule"] for _id, f in await redis.xrange(KEYS.event_stream)
                if json.loads(f[b"m"])["kind"] == "alert_resolved"]
    assert sorted(resolved) == ["cpu_exhaustion", "memory_exhaustion"]


async def test_redis_near_maxmemory_raises_and_resolves(redis: aioredis.Redis, settings) -> None:
    monitor = monitor_for(redis, settings)
    await write_health(redis)
    used = int((await redis.info("memory"))["used_memory"])
    try:
        await redis.config_set("maxmemory", int(used / 0.93))  # 93% used, headroom for the alert
        assert list(await check_again(monitor)) == ["redis_memory"]
        await redis.config_set("maxmemory", 0)
        assert await check_again(monitor) == {}
    finally:
        await redis.config_set("maxmemory", 0)


async def test_pending_backlog_raises_and_resolves_when_acknowledged(redis: aioredis.Redis, settings) -> None:
    monitor = monitor_for(redis, settings)
    await write_health(redis)
    await redis.xgroup_create(KEYS.job_stream, GROUP_AGGREGATOR, id="0", mkstream=True)
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(PENDING_BACKLOG_LIMIT):
            pipe.xadd(KEYS.job_stream, {"m": str(i)})
        await pipe.execute()
    [(_stream, entries)] = await redis.xreadgroup(GROUP_AGGREGATOR, "aggregator-0", {KEYS.job_stream: ">"},
                                                  count=PENDING_BACKLOG_LIMIT)
    assert list(await check_again(monitor)) == [f"pending_backlog:{KEYS.job_stream}/{GROUP_AGGREGATOR}"]
    await redis.xack(KEYS.job_stream, GROUP_AGGREGATOR, entries[0][0])  # one below the limit
    assert await check_again(monitor) == {}


async def test_accuracy_drop_raises_and_resolves_when_a_version_recovers(redis: aioredis.Redis, settings) -> None:
    monitor = monitor_for(redis, settings)
    await write_health(redis)
    await redis.sadd(KEYS.active_trainings, "t")
    await redis.rpush(KEYS.training_metrics("t"), round_metrics(0, 0.5), round_metrics(1, 0.8),
                      round_metrics(2, 0.7))  # 0.7 is more than 5% below 0.8
    opened = await check_again(monitor)
    assert list(opened) == ["accuracy_drop:t"] and opened["accuracy_drop:t"].training_id == "t"
    await redis.rpush(KEYS.training_metrics("t"), round_metrics(3, 0.79))
    assert await check_again(monitor) == {}


async def test_system_health_reports_process_usage_and_judges_with_the_rules(redis: aioredis.Redis) -> None:
    await write_health(redis, cpu={"aggregator": 99.0})
    await redis.set(KEYS.service_health("monitor", "0"),
                    json.dumps({"service": "monitor", "instance": "0", "at": time.time()}), ex=10)
    report = await system_health(redis, KEYS)
    assert report["services"]["aggregator"][0]["cpu_percent"] == 99.0
    assert report["health_status"] == "degraded"
    assert report["reasons"] == ["process aggregator/0 uses 99% of a CPU core (limit 95%)"]
    await write_health(redis, memory={"privacy": 95.0})
    report = await system_health(redis, KEYS)
    assert report["health_status"] == "critical" and "privacy/0" in report["reasons"][0]
    await write_health(redis)
    assert (await system_health(redis, KEYS))["health_status"] == "healthy"


async def test_agent_failure_rate_raises_and_resolves(redis: aioredis.Redis, settings) -> None:
    monitor = monitor_for(redis, settings)
    await write_health(redis)
    await redis.sadd(KEYS.active_trainings, "t")
    await redis.hset(KEYS.agent_outcomes("t"), mapping={"flaky": "1000100", "steady": "1111111"})
    opened = await check_again(monitor)
    assert list(opened) == ["agent_failure_rate:t:flaky"]
    await redis.hset(KEYS.agent_outcomes("t"), "flaky", "1000100" + "1" * 10)
    assert await check_again(monitor) == {}


async def test_coordinator_records_completions_and_dropouts(redis: aioredis.Redis, system, make_agents) -> None:
    from tests.integration.conftest import digits_config, start_training, wait_for_status

    await system.start()
    await make_agents(3)
    await start_training(redis, "o", digits_config(rounds=2, clients_per_round=3))
    await wait_for_status(redis, "o", {"completed"})
    outcomes = {k.decode(): v.decode() for k, v in (await redis.hgetall(KEYS.agent_outcomes("o"))).items()}
    assert sorted(outcomes) == ["agent-000", "agent-001", "agent-002"] and set("".join(outcomes.values())) == {"1"}


async def test_an_agent_pulling_against_the_others_earns_no_contribution(redis: aioredis.Redis, system,
                                                                         make_agents) -> None:
    """Contribution (the ``contribution`` selection policy and the leaderboard) comes from the
    aggregator's scores: examples x max(0, cosine to the median update), summed per committed round."""
    from agents.attacks import Attack
    from tests.integration.conftest import digits_config, start_training, wait_for_status

    await system.start()
    agents = await make_agents(6)
    agents[0].attack = Attack.SIGN_FLIP
    await start_training(redis, "credit", digits_config(rounds=2, clients_per_round=6, min_clients=6))

    state = await wait_for_status(redis, "credit", {"completed", "failed"})

    assert state.status == "completed", state.reason
    credit = {k.decode(): float(v) for k, v in (await redis.hgetall(KEYS.agent_contributions)).items()}
    attacker, honest = agents[0].agent_id, [a.agent_id for a in agents[1:]]
    assert credit.get(attacker, 0.0) == 0.0
    assert all(credit[a] > 0 for a in honest), credit
    assert all(credit[a.agent_id] <= 2 * max(a.dataset_sizes().values()) for a in agents[1:])  # examples x 2 rounds
    metrics = [RoundMetrics.model_validate_json(m) for m in await redis.lrange(KEYS.training_metrics("credit"), 0, -1)]
    assert all(m.update_norm_mean is not None and m.update_norm_mean > 0 for m in metrics)
