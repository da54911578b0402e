"""The monitor's Python API: training metrics, progress, system health and alerts.

One object over a deployment's Redis with the method names of the original design
(``record_training_metric``, ``get_training_progress``, ``get_system_health``,
``get_alerts``). The monitor service writes the metric series and alerts it reads; the
dashboard's ``/api/system/health`` and ``/api/alerts`` answer through it, so a script
that uses this API sees what the page sees:

    client = await federated_learning.bus.connection.connect(deployment_redis_url)
    monitor = TrainingMonitor(client, keys_for(client, settings.redis_key_prefix, settings.coordinator_partitions))
    progress = await monitor.get_training_progress("my-training")
    critical = await monitor.get_alerts("my-training", "critical")
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from federated_learning.monitoring.alerts import EXPECTED_SERVICES, Alert, services_down
from federated_learning.monitoring.metrics import METRIC_SERIES_MAXLEN, MetricType, TrainingMetric
from federated_learning.monitoring.rules import (
    health_verdict,
    pending_backlog,
    process_resources,
    process_usages,
    redis_memory,
)
from federated_learning.protocol.keys import Keys
from federated_learning.records.trainings import TrainingViews
from federated_learning.services.runtime import (
    read_backlogs,
    read_health_records,
    read_redis_memory,
)

SeverityName = Literal["info", "warning", "critical"]


class UnknownTraining(LookupError):
    """No training with this id."""

    def __init__(self, training_id: str) -> None:
        super().__init__(f"no training '{training_id}'")
        self.training_id = training_id


class TrainingProgress(BaseModel):
    """Where a training stands, and the latest value of each metric the monitor recorded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    training_id: str
    status: str
    reason: str
    round: int
    completed_rounds: int
    rounds: int
    fraction_done: float
    current_version: int | None
    best_accuracy: float | None
    epsilon_spent: float
    latest: dict[MetricType, float]
    """Latest recorded value per metric type (absent: never recorded)."""
    series_length: int


class TrainingMonitor:
    """Read and record what the monitor knows; no service needs to run for the reads."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.trainings = TrainingViews(redis, keys)

    async def record_training_metric(self, metric: TrainingMetric) -> None:
        """Append one metric to its training's series (what the monitor does for each round)."""
        key = self.keys.metric_series(metric.training_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, metric.model_dump_json())
            pipe.ltrim(key, -METRIC_SERIES_MAXLEN, -1)
            await pipe.execute()

    async def get_training_metrics(self, training_id: str,
                                   metric_type: MetricType | None = None) -> list[TrainingMetric]:
        """A training's recorded series, oldest first, optionally of one metric type."""
        raw = await self.redis.lrange(self.keys.metric_series(training_id), 0, -1)
        metrics = [TrainingMetric.model_validate_json(value) for value in raw]
        return [m for m in metrics if metric_type is None or m.metric_type == metric_type]

    async def get_training_progress(self, training_id: str) -> TrainingProgress:
        """Status, rounds done of rounds planned, version, best accuracy, epsilon and the latest
        recorded metrics. Raises UnknownTraining."""
        state = await self.trainings.get(training_id)
        if state is None:
            raise UnknownTraining(training_id)
        metrics = await self.get_training_metrics(training_id)
        latest: dict[MetricType, float] = {}
        for metric in metrics:  # oldest first: later rounds overwrite
            latest[metric.metric_type] = metric.value
        return TrainingProgress(
            training_id=training_id, status=state.status.value, reason=state.reason, round=state.round,
            completed_rounds=state.completed_rounds, rounds=state.config.rounds,
            fraction_done=min(1.0, state.completed_rounds / state.config.rounds),
            current_version=state.current_version, best_accuracy=state.best_accuracy,
            epsilon_spent=state.epsilon_spent, latest=latest, series_length=len(metrics))

    async def get_system_health(self) -> dict[str, Any]:
        """Each service's instances with their age, CPU (% of one core) and memory; Redis memory;
        stream backlogs; and ``health_status`` (healthy, degraded, critical) with the reasons."""
        records = await read_health_records(self.redis, self.keys)
        services: dict[str, list[dict[str, Any]]] = {}
        now = time.time()
        for record in records:
            record["age_s"] = round(now - record["at"], 2)
            services.setdefault(record["service"], []).append(record)
        used_memory, maxmemory = await read_redis_memory(self.redis)
        backlogs = await read_backlogs(self.redis, self.keys)
        verdict, reasons = health_verdict(
            services_down(services, (*EXPECTED_SERVICES, "monitor"))
            + process_resources(process_usages(records))
            + redis_memory(used_memory, maxmemory)
            + pending_backlog({b.name: b.pending for b in backlogs}))
        return {
            "health_status": verdict, "reasons": reasons, "services": services,
            "streams": [asdict(b) for b in backlogs],
            "redis": {"used_memory": used_memory, "maxmemory": maxmemory},
        }

    async def get_alerts(self, training_id: str | None = None, severity: SeverityName | None = None,
                         *, open_only: bool = False) -> list[Alert]:
        """Alerts, newest first, of one training and/or one severity, optionally only open ones."""
        records = [Alert.model_validate_json(v) for v in (await self.redis.hgetall(self.keys.alerts)).values()]
        chosen = [a for a in records
                  if (training_id is None or a.training_id == training_id)
                  and (severity is None or a.severity == severity)
                  and (not open_only or a.is_open)]
        return sorted(chosen, key=lambda a: a.created_at, reverse=True)
