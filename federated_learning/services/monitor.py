"""Monitor: records round metrics and dropouts from the event stream; raises and resolves alerts.

One-off alerts come from events: suspicious updates, rollbacks, the privacy budget (a release
at 80% or 100% of it, or a refused release), and a round whose accuracy or loss jumps against
the training's recent trend.

Continuous alerts come from the rules in :mod:`federated_learning.monitoring.alerts` and
:mod:`federated_learning.monitoring.rules`, applied every ``CHECK_EVERY_S`` to the services'
health records (liveness, CPU, memory), Redis memory, the service streams' pending counts, and
the active trainings' round state and per-version accuracies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Gauge
from redis.asyncio.client import Pipeline

from federated_learning.bus.consumer import StreamConsumer, run_consumers, trim_consumed
from federated_learning.bus.replies import text
from federated_learning.monitoring.alerts import (
    RECONCILED_RULES,
    Alert,
    Condition,
    RoundObservation,
    open_by_severity,
    reconcile,
    services_down,
    stalled_rounds,
)
from federated_learning.monitoring.anomaly import (
    JUMP_HISTORY,
    UpdateFlag,
    anomaly_conditions,
    series_jump_conditions,
)
from federated_learning.monitoring.metrics import (
    METRIC_SERIES_MAXLEN,
    MetricType,
    TrainingMetric,
    metrics_from_round,
)
from federated_learning.monitoring.rules import (
    accuracy_drop,
    agent_failure_rate,
    model_refused,
    pending_backlog,
    privacy_budget,
    process_resources,
    process_usages,
    redis_memory,
    release_refused,
    version_accuracies,
)
from federated_learning.privacy.levels import PrivacyLevel, privacy_targets
from federated_learning.protocol.events import (
    Event,
    ModelReleasedEvent,
    RolledBack,
    RoundCompleted,
    TrainingStatusChanged,
    UpdateAnomaly,
)
from federated_learning.protocol.keys import GROUP_MONITOR
from federated_learning.protocol.messages import (
    Severity,
)
from federated_learning.records.partitions import recorded_partition_count
from federated_learning.records.trainings import TrainingViews
from federated_learning.services.runtime import (
    HEALTH_TTL_S,
    PER_TRAINING,
    ServiceContext,
    forget_training,
    per_training,
    read_backlogs,
    read_health_records,
    read_redis_memory,
    service_main,
    service_streams,
)

log = logging.getLogger(__name__)

CHECK_EVERY_S = 2.0
TRIM_EVERY_S = 60.0
"""How often the service streams are trimmed of what their consumers have handled."""

STARTUP_GRACE_S = HEALTH_TTL_S + 5
APPLIED_MARKER_TTL_S = 24 * 3600
"""How long a handled event's marker is kept (redeliveries come within minutes of a crash)."""

EVENTS = Counter("fl_monitor_events_total", "Events seen", ["kind"])
DROPOUTS = Counter("fl_agent_dropouts_total", "Agents that dropped out of a round")
ALERTS_OPEN = Gauge("fl_alerts_open", "Open alerts (as the page lists them)", ["severity"])
PENDING = Gauge("fl_bus_pending_messages", "Delivered but unacknowledged entries", ["stream", "group"])
ACCURACY = per_training(Gauge("fl_training_accuracy", "Latest federated evaluation accuracy", ["training"]))


class Monitor:
    def __init__(self, ctx: ServiceContext, *, startup_grace_s: float = STARTUP_GRACE_S) -> None:
        self.ctx = ctx
        self.started_at = time.time()
        self.startup_grace_s = startup_grace_s
        self._last_trim = time.time()
        self._last_check = 0.0
        self.trainings = TrainingViews(ctx.redis, ctx.keys)
        self.consumers = [StreamConsumer(
            ctx.redis, GROUP_MONITOR, f"monitor-{ctx.instance}",
            {cell.event_stream: self._of_cell(cell.cell)},
            dead_letter_stream=ctx.dead_letter_stream, claim_idle_ms=ctx.settings.claim_idle_ms,
            on_forged_id=ctx.forged_stream_id,
        ) for cell in ctx.keys.cells]
        self.consumer = self.consumers[0]

    def _of_cell(self, cell: int) -> Callable[[bytes, dict[bytes, bytes]], Awaitable[None]]:
        async def on_event(entry_id: bytes, fields: dict[bytes, bytes]) -> None:
            await self.on_event(entry_id, fields, cell=cell)
        return on_event

    async def run(self, *, burst: bool = False) -> None:
        await run_consumers(self.consumers, self.ctx.stop, burst=burst, on_idle=self.check)

    async def _apply_once(self, entry_id: bytes, stage: Callable[[Pipeline], None], cell: int) -> None:
        """Apply counter and series updates of one event exactly once: they go in one
        transaction with a marker, and a redelivered event whose marker exists is skipped. The
        marker is the deployment's (with the alerts), named by the event's cell and entry."""
        marker = self.ctx.keys.applied("monitor" if cell == 0 else f"monitor-p{cell}", entry_id.decode())
        if await self.ctx.redis.exists(marker):
            return
        async with self.ctx.redis.pipeline(transaction=True) as pipe:
            stage(pipe)
            pipe.set(marker, 1, ex=APPLIED_MARKER_TTL_S)
            await pipe.execute()

    async def on_event(self, entry_id: bytes, fields: dict[bytes, bytes], cell: int = 0) -> None:
        event = await self.ctx.decoded(Event, fields, "events")
        if event is None:
            return
        EVENTS.labels(event.kind).inc()
        if event.kind == "round_completed" and event.training_id and event.round is not None:
            completed = event.payload(RoundCompleted)
            metrics = metrics_from_round(completed, event.training_id, event.round)
            if metrics:
                key = self.ctx.keys.metric_series(event.training_id)

                def add_series(pipe: Pipeline) -> None:
                    pipe.rpush(key, *(m.model_dump_json() for m in metrics))
                    pipe.ltrim(key, -METRIC_SERIES_MAXLEN, -1)

                await self._apply_once(entry_id, add_series, cell)
                jumps = series_jump_conditions(event.training_id, await self._recent_series(event.training_id),
                                               event.round)
                if jumps:
                    await self.raise_once(jumps)
            if completed.eval_accuracy is not None:
                ACCURACY.labels(event.training_id).set(completed.eval_accuracy)
        elif event.kind == "update_anomaly" and event.training_id and event.round is not None:
            flags = [UpdateFlag(**flag.model_dump()) for flag in event.payload(UpdateAnomaly).flags]

            def count_flags(pipe: Pipeline) -> None:
                for flag in flags:
                    pipe.hincrby(self.ctx.keys.agent_flags, flag.agent_id, 1)

            await self._apply_once(entry_id, count_flags, cell)
            await self.raise_once(anomaly_conditions(flags, event.training_id, event.round))
        elif event.kind == "rollback" and event.training_id:
            await self.raise_once([Condition(
                key=f"rollback:{event.training_id}:{event.payload(RolledBack).to_version}:{event.at:.0f}",
                rule="rollback", severity=Severity.WARNING, training_id=event.training_id,
                message=event.message,
                action="inspect the versions that degraded (compare them on the dashboard) and the "
                       "agents flagged in those rounds; consider a robust aggregation rule")])
        elif event.kind == "model_released" and event.training_id \
                and (report := event.payload(ModelReleasedEvent)).level != "none":
            target = privacy_targets(PrivacyLevel(report.level)).epsilon
            await self.raise_once(privacy_budget(event.training_id, report.epsilon_spent, target))
        elif event.kind == "model_refused" and event.training_id and event.agent_id:
            await self.raise_once(model_refused(event.training_id, event.agent_id, event.message))
        elif event.kind == "release_refused" and event.training_id:
            await self.raise_once(release_refused(event.training_id, event.message))
        elif event.kind == "training_status" and event.training_id \
                and event.payload(TrainingStatusChanged).status.is_final:
            forget_training(event.training_id, PER_TRAINING)
        elif event.kind == "agent_dropped" and event.agent_id:
            DROPOUTS.inc()
            agent_id = event.agent_id

            def count_dropout(pipe: Pipeline) -> None:
                pipe.hincrby(self.ctx.keys.agent_dropouts, agent_id, 1)

            await self._apply_once(entry_id, count_dropout, cell)

    async def _recent_series(self, training_id: str) -> list[TrainingMetric]:
        """The last ``JUMP_HISTORY`` rounds' worth of the training's recorded metrics, oldest first."""
        raw = await self.ctx.redis.lrange(self.ctx.keys.metric_series(training_id),
                                          -JUMP_HISTORY * len(MetricType), -1)
        return [TrainingMetric.model_validate_json(entry) for entry in raw]

    async def raise_once(self, conditions: list[Condition]) -> None:
        """Open alerts for one-off conditions (they stay open until acknowledged). Reads only the
        open alerts of these conditions: a round that flags a thousand agents, with a thousand
        alerts already open, costs a few round trips, not one per open alert."""
        if not conditions:
            return
        open_alerts = await self._open_alerts([condition.key for condition in conditions])
        raised, _ = reconcile(open_alerts, conditions, time.time())
        await self._store(raised, [])
        for alert in raised:  # the next check sets the gauge from every open alert again
            ALERTS_OPEN.labels(alert.severity.value).inc()

    async def check(self) -> None:
        """Apply the alert rules, at most every ``CHECK_EVERY_S``."""
        now = time.time()
        if now - self._last_check < CHECK_EVERY_S:
            return
        self._last_check = now
        if now - self._last_trim >= TRIM_EVERY_S:
            self._last_trim = now
            readers: dict[str, list[str]] = {}
            partitions = await recorded_partition_count(self.ctx.redis, self.ctx.keys)
            for stream, group in service_streams(self.ctx.keys, partitions):
                readers.setdefault(stream, []).append(group)
            for stream, groups in readers.items():
                if GROUP_MONITOR not in groups:  # the events are capped by length; the dashboard tails them
                    await trim_consumed(self.ctx.redis, stream, *groups)
        conditions = await self._system_conditions(now) + await self._training_conditions(now)
        every_open = await self._open_alerts()
        open_alerts = {k: a for k, a in every_open.items() if a.rule in RECONCILED_RULES}
        raised, resolved = reconcile(open_alerts, conditions, now)
        await self._store(raised, resolved)
        gone = {alert.key for alert in resolved}
        publish_open_alerts([a for k, a in every_open.items() if k not in gone] + raised)

    async def _system_conditions(self, now: float) -> list[Condition]:
        """Services down, processes short of CPU or memory, Redis near maxmemory, stream backlogs."""
        records = await read_health_records(self.ctx.redis, self.ctx.keys)
        conditions = []
        if now - self.started_at >= self.startup_grace_s:
            conditions += services_down(str(r.get("service")) for r in records)
        conditions += process_resources(process_usages(records))
        conditions += redis_memory(*await read_redis_memory(self.ctx.redis))
        backlogs = await read_backlogs(self.ctx.redis, self.ctx.keys)
        for backlog in backlogs:
            PENDING.labels(backlog.stream, backlog.group).set(backlog.pending)
        conditions += pending_backlog({b.name: b.pending for b in backlogs})
        return conditions

    async def _training_conditions(self, now: float) -> list[Condition]:
        """Stalled rounds and accuracy drops of the active trainings."""
        observations, conditions = [], []
        for training_id in await self.trainings.active_ids():
            state = await self.trainings.get(training_id)
            if state is not None:
                observations.append(RoundObservation(
                    training_id=state.training_id, round=state.round, phase=state.phase.value,
                    started_at=state.round_started_at, deadline_s=state.round_deadline_s))
            accuracies = version_accuracies(await self.trainings.metrics(training_id))
            conditions += accuracy_drop(training_id, accuracies)
            outcomes = await self.ctx.redis.hgetall(self.ctx.keys.agent_outcomes(training_id))
            conditions += agent_failure_rate(
                training_id, {text(agent): [c == "1" for c in text(history)] for agent, history in outcomes.items()})
        return stalled_rounds(observations, now) + conditions

    async def _open_alerts(self, keys: list[str] | None = None) -> dict[str, Alert]:
        """Condition key -> open alert: every one, or those of condition ``keys`` (two round trips)."""
        if keys is None:
            open_ids = {text(key): text(alert_id)
                        for key, alert_id in (await self.ctx.redis.hgetall(self.ctx.keys.open_alerts)).items()}
        else:
            found = await self.ctx.redis.hmget(self.ctx.keys.open_alerts, keys)
            open_ids = {key: text(alert_id) for key, alert_id in zip(keys, found, strict=True) if alert_id is not None}
        if not open_ids:
            return {}
        raws = await self.ctx.redis.hmget(self.ctx.keys.alerts, list(open_ids.values()))
        return {key: Alert.model_validate_json(raw)
                for key, raw in zip(open_ids, raws, strict=True) if raw is not None}

    async def _store(self, raised: list[Alert], resolved: list[Alert]) -> None:
        """Open ``raised`` and close ``resolved``, with an event each, in one transaction (the
        events on the deployment's stream, in the alerts' hash slot)."""
        if not raised and not resolved:
            return
        async with self.ctx.redis.pipeline(transaction=True) as pipe:
            for alert, opened in [*((a, True) for a in raised), *((a, False) for a in resolved)]:
                pipe.hset(self.ctx.keys.alerts, alert.alert_id, alert.model_dump_json())
                if opened:
                    pipe.hset(self.ctx.keys.open_alerts, alert.key, alert.alert_id)
                else:
                    pipe.hdel(self.ctx.keys.open_alerts, alert.key)
                self.ctx.stage_deployment_emit(pipe, "alert" if opened else "alert_resolved",
                                               alert.message if opened else f"resolved: {alert.message}",
                                               severity=alert.severity if opened else Severity.INFO,
                                               training_id=alert.training_id, alert=alert.model_dump(mode="json"))
            await pipe.execute()


def publish_open_alerts(open_alerts: list[Alert]) -> None:
    """Set ``fl_alerts_open`` per severity to the open alerts, one-off and continuous alike: the
    ones the page lists (an acknowledgement on the page shows at the next check)."""
    for severity, count in open_by_severity(open_alerts).items():
        ALERTS_OPEN.labels(severity.value).set(count)


def main() -> None:
    service_main("monitor", "federated learning monitor", lambda ctx: Monitor(ctx).run)


if __name__ == "__main__":
    main()
