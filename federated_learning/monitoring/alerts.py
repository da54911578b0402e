"""Alert rules over observed state, and the raise/resolve bookkeeping.

A rule turns observations into *conditions* (something is wrong now, keyed so the
same trouble is one alert); :func:`reconcile` turns conditions into raised and
resolved alerts against the alerts already open.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from federated_learning.protocol.messages import Severity

EXPECTED_SERVICES = ("coordinator", "aggregator", "privacy", "versions", "dashboard")
RECONCILED_RULES = frozenset({
    "service_down", "stalled_round", "cpu_exhaustion", "memory_exhaustion", "redis_memory",
    "pending_backlog", "accuracy_drop", "agent_failure_rate",
})
"""Rules re-checked continuously (resolved when the condition is gone); other alerts are
one-off (an anomalous update, a rollback) and resolve when an operator acknowledges them."""
STALLED_ROUND_FACTOR = 2.0
"""A round is stalled when it has run this many times its deadline."""


class Alert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alert_id: str
    key: str
    rule: str
    severity: Severity
    message: str
    action: str
    training_id: str | None = None
    created_at: float = Field(default_factory=time.time)
    resolved_at: float | None = None
    acknowledged: bool = False

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None


@dataclass(frozen=True)
class Condition:
    """Trouble observed now. ``key`` identifies it across checks (one alert per key)."""

    key: str
    rule: str
    severity: Severity
    message: str
    action: str
    training_id: str | None = None


def alert_id_for(key: str, opened_at: float) -> str:
    return hashlib.sha256(f"{key}@{opened_at:.6f}".encode()).hexdigest()[:16]


def services_down(alive_services: Iterable[str],
                  expected: Iterable[str] = EXPECTED_SERVICES) -> list[Condition]:
    """A condition for each expected service without a live instance."""
    alive = set(alive_services)
    return [
        Condition(key=f"service_down:{service}", rule="service_down", severity=Severity.CRITICAL,
                  message=f"service '{service}' has no live instance (health key expired)",
                  action=f"check the {service} log under the data folder's logs/; the deploy "
                         "supervisor restarts crashed services, so a lasting outage means it keeps failing")
        for service in sorted(set(expected) - alive)
    ]


@dataclass(frozen=True)
class RoundObservation:
    training_id: str
    round: int
    phase: str
    started_at: float
    deadline_s: float


def stalled_rounds(rounds: Iterable[RoundObservation], now: float) -> list[Condition]:
    """A condition for each round running longer than ``STALLED_ROUND_FACTOR`` times its deadline."""
    found = []
    for obs in rounds:
        elapsed = now - obs.started_at
        if obs.phase != "idle" and obs.started_at > 0 and elapsed > STALLED_ROUND_FACTOR * obs.deadline_s:
            found.append(Condition(
                key=f"stalled_round:{obs.training_id}:{obs.round}", rule="stalled_round",
                severity=Severity.WARNING, training_id=obs.training_id,
                message=f"round {obs.round} has been {obs.phase} for {elapsed:.0f}s "
                        f"(deadline {obs.deadline_s:.0f}s)",
                action="check that agents are alive and that the aggregator, privacy and version "
                       "services are up; the coordinator retries rounds whose agents drop out",
            ))
    return found


def open_by_severity(alerts: Iterable[Alert]) -> dict[Severity, int]:
    """How many of ``alerts`` are open, per severity (every severity, 0 when none): one-off
    alerts and continuously checked ones alike, as the page lists them."""
    counts = dict.fromkeys(Severity, 0)
    for alert in alerts:
        if alert.is_open:
            counts[alert.severity] += 1
    return counts


def reconcile(open_alerts: Mapping[str, Alert], conditions: Iterable[Condition],
              now: float) -> tuple[list[Alert], list[Alert]]:
    """Alerts to raise (new conditions) and to resolve (open alerts whose condition is gone).

    ``open_alerts`` maps condition key -> the open alert for it.
    """
    current = {condition.key: condition for condition in conditions}
    raised = [
        Alert(alert_id=alert_id_for(key, now), key=key, rule=c.rule, severity=c.severity, message=c.message,
              action=c.action, training_id=c.training_id, created_at=now)
        for key, c in current.items() if key not in open_alerts
    ]
    resolved = [
        alert.model_copy(update={"resolved_at": now})
        for key, alert in open_alerts.items() if key not in current
    ]
    return raised, resolved
