"""The monitor's Python API (``federated_learning.training_monitor``) against a real valkey-server."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from federated_learning.monitoring.alerts import EXPECTED_SERVICES, Alert
from federated_learning.monitoring.metrics import MetricType, TrainingMetric
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import Severity
from federated_learning.training_monitor import TrainingMonitor, UnknownTraining
from tests.integration.conftest import digits_config, start_training, wait_for_status

KEYS = Keys()


async def test_progress_of_a_finished_training_carries_the_monitors_latest_metrics(
        redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(4)
    await start_training(redis, "watched", digits_config(rounds=3))
    await wait_for_status(redis, "watched", {"completed"})
    monitor = TrainingMonitor(redis, KEYS)
    await monitor.record_training_metric(TrainingMetric(training_id="watched", round_number=99,
                                                        metric_type=MetricType.UPDATE_NORM, value=1.5))

    progress = await monitor.get_training_progress("watched")

    assert (progress.status, progress.completed_rounds, progress.rounds, progress.fraction_done) == \
        ("completed", 3, 3, 1.0)
    assert progress.current_version == 3
    assert progress.latest[MetricType.UPDATE_NORM] == 1.5  # the metric recorded last wins
    assert 0.0 < progress.latest[MetricType.ACCURACY] <= 1.0
    accuracy = await monitor.get_training_metrics("watched", MetricType.ACCURACY)
    assert [m.round_number for m in accuracy] == [1, 2, 3]  # the monitor service recorded every round
    with pytest.raises(UnknownTraining, match="no training 'nope'"):
        await monitor.get_training_progress("nope")


async def test_alerts_filter_by_training_and_severity(redis: aioredis.Redis) -> None:
    def alert(alert_id: str, training: str | None, severity: Severity, at: float) -> Alert:
        return Alert(alert_id=alert_id, key=alert_id, rule="r", severity=severity, message="m", action="a",
                     training_id=training, created_at=at)

    for a in (alert("a1", "t1", Severity.CRITICAL, 1.0), alert("a2", "t1", Severity.WARNING, 2.0),
              alert("a3", "t2", Severity.CRITICAL, 3.0),
              alert("a4", "t1", Severity.CRITICAL, 4.0).model_copy(update={"resolved_at": 5.0})):
        await redis.hset(KEYS.alerts, a.alert_id, a.model_dump_json())
    monitor = TrainingMonitor(redis, KEYS)

    assert [a.alert_id for a in await monitor.get_alerts("t1", "critical")] == ["a4", "a1"]
    assert [a.alert_id for a in await monitor.get_alerts("t1", "critical", open_only=True)] == ["a1"]
    assert [a.alert_id for a in await monitor.get_alerts(severity="critical")] == ["a4", "a3", "a1"]
    assert len(await monitor.get_alerts()) == 4


async def test_system_health_names_each_service_and_its_verdict(redis: aioredis.Redis, settings) -> None:
    from federated_learning.services.runtime import ServiceContext

    monitor = TrainingMonitor(redis, KEYS)
    down = await monitor.get_system_health()
    assert down["health_status"] == "critical" and any("coordinator" in r for r in down["reasons"])

    for service in (*EXPECTED_SERVICES, "monitor"):  # each writes its health record as a service does
        await ServiceContext(redis=redis, settings=settings, service=service, instance="0").refresh_health()
    health = await monitor.get_system_health()

    assert health["health_status"] == "healthy", health["reasons"]
    assert set(EXPECTED_SERVICES) <= set(health["services"])
    for records in health["services"].values():
        assert all("cpu_percent" in r and "rss_bytes" in r and r["age_s"] >= 0 for r in records)
    assert health["redis"]["used_memory"] > 0 and isinstance(health["streams"], list)
