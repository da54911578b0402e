"""Alert rules over training, privacy and system observations.

Each rule is a pure function from observations to :class:`Condition` values (see
:mod:`federated_learning.monitoring.alerts`): a stable key (one alert per trouble), a
severity, a message saying what happened and where, an action saying what to do. Every
rule fires *at* its threshold, not only beyond it, so a test at the boundary is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from federated_learning.monitoring.alerts import Condition
from federated_learning.protocol.messages import RoundMetrics, Severity
from federated_learning.types import AgentId, ModelVersion

ACCURACY_DROP_THRESHOLD = 0.05
"""Relative drop from the best accuracy, as in the rollback policy."""
FAILURE_RATE_THRESHOLD = 0.5
FAILURE_WINDOW = 10
"""Most recent tasks per agent that the failure rate looks at."""
FAILURE_MIN_TASKS = 3
"""Fewer tasks than this in the window say nothing about an agent."""
PRIVACY_WARNING_FRACTION = 0.8
PRIVACY_EXHAUSTED_FRACTION = 1.0
PRIVACY_EXHAUSTED_TOLERANCE = 1e-3
"""Relative shortfall that still counts as exhausted: the noise is calibrated so the last
release spends just under the target (2.99998 of 3), never exactly all of it."""
REDIS_MEMORY_FRACTION = 0.9
PENDING_BACKLOG_LIMIT = 1000
CPU_PERCENT_LIMIT = 95.0
"""Percent of one core: a single-threaded service at this load cannot keep up."""
MEMORY_PERCENT_LIMIT = 90.0


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1]; got {value}")


def accuracy_drop(training_id: str, accuracies: Mapping[ModelVersion, float],
                  threshold: float = ACCURACY_DROP_THRESHOLD) -> list[Condition]:
    """Warn when the newest version's accuracy is at or below best * (1 - threshold)."""
    _check_fraction("threshold", threshold)
    if not accuracies:
        return []
    latest = max(accuracies)
    best = max(accuracies, key=lambda v: (accuracies[v], v))
    floor = accuracies[best] * (1.0 - threshold)
    if latest == best or accuracies[latest] > floor:
        return []
    return [Condition(
        key=f"accuracy_drop:{training_id}", rule="accuracy_drop", severity=Severity.WARNING,
        training_id=training_id,
        message=f"training {training_id}: version {latest} scored {accuracies[latest]:.4f}, at least "
                f"{threshold:.1%} below the best {accuracies[best]:.4f} (version {best})",
        action="look at the latest rounds' participants and anomaly flags; the rollback policy "
               "acts after repeated drops, or roll back by hand to a good version",
    )]


def version_accuracies(metrics: Iterable[RoundMetrics]) -> dict[ModelVersion, float]:
    """Federated accuracy per evaluated version (``eval_of_version``); the latest evaluation of
    a version wins."""
    return {m.eval_of_version: m.eval_accuracy for m in metrics
            if m.eval_of_version is not None and m.eval_accuracy is not None}


def agent_failure_rate(training_id: str, outcomes: Mapping[AgentId, Sequence[bool]],
                       window: int = FAILURE_WINDOW, threshold: float = FAILURE_RATE_THRESHOLD,
                       min_tasks: int = FAILURE_MIN_TASKS) -> list[Condition]:
    """Warn for each agent that failed at least ``threshold`` of its last ``window`` tasks.

    ``outcomes[agent]`` lists its tasks oldest first: True completed, False failed (dropped
    or timed out). Agents with fewer than ``min_tasks`` outcomes in the window are skipped.
    """
    _check_fraction("threshold", threshold)
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    found = []
    for agent in sorted(outcomes):
        recent = list(outcomes[agent])[-window:]
        if not recent or len(recent) < min_tasks:
            continue
        rate = recent.count(False) / len(recent)
        if rate < threshold:
            continue
        found.append(Condition(
            key=f"agent_failure_rate:{training_id}:{agent}", rule="agent_failure_rate",
            severity=Severity.WARNING, training_id=training_id,
            message=f"agent {agent} failed {recent.count(False)} of its last {len(recent)} tasks "
                    f"in training {training_id} ({rate:.0%}, threshold {threshold:.0%})",
            action=f"check agent {agent}'s connectivity, load and logs; remove it from the training "
                   "if it keeps failing, since each failure can cost a round its deadline",
        ))
    return found


def _budget_exhausted(training_id: str, message: str) -> Condition:
    return Condition(
        key=f"privacy_budget_exhausted:{training_id}", rule="privacy_budget_exhausted",
        severity=Severity.CRITICAL, training_id=training_id, message=message,
        action="the privacy manager refuses further releases and the training stops; keep the "
               "last released version, or start a new training only if the data owners agree",
    )


def privacy_budget(training_id: str, epsilon_spent: float, epsilon_target: float,
                   tolerance: float = PRIVACY_EXHAUSTED_TOLERANCE) -> list[Condition]:
    """Warn at 80% of the epsilon budget; critical at 100% less the relative ``tolerance``
    (only the higher of the two)."""
    if epsilon_target <= 0:
        raise ValueError(f"epsilon_target must be > 0; got {epsilon_target}")
    if epsilon_spent < 0:
        raise ValueError(f"epsilon_spent must be >= 0; got {epsilon_spent}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1); got {tolerance}")
    used = epsilon_spent / epsilon_target
    spent = (f"training {training_id} has spent epsilon {epsilon_spent:.3g} of "
             f"{epsilon_target:.3g} ({used:.0%})")
    if used >= PRIVACY_EXHAUSTED_FRACTION * (1.0 - tolerance):
        return [_budget_exhausted(training_id, spent)]
    if used >= PRIVACY_WARNING_FRACTION:
        return [Condition(
            key=f"privacy_budget_warning:{training_id}", rule="privacy_budget_warning",
            severity=Severity.WARNING, training_id=training_id, message=spent,
            action="plan the remaining rounds: the training stops releasing models when the budget "
                   "is spent; raise the noise multiplier or lower the sampling rate to stretch it",
        )]
    return []


def model_refused(training_id: str, agent_id: str, detail: str) -> list[Condition]:
    """Warning, once per (training, agent): the agent's model is not the training's (another layout,
    or parameters that cannot be a model), so it does not take part."""
    return [Condition(
        key=f"model_refused:{training_id}:{agent_id}", rule="model_refused", severity=Severity.WARNING,
        training_id=training_id, message=f"agent {agent_id} cannot take part: {detail}",
        action="give the agent the training's model (the training's status lists its layers), or start "
               "another training for the agent's model")]


def release_refused(training_id: str, reason: str) -> list[Condition]:
    """Critical: the privacy manager refused a release. It refuses only when one more release
    would exceed the budget (``ReleaseRefused``), so a refusal means the budget is spent; the
    key is the exhausted alert's, so a training gets one such alert either way."""
    return [_budget_exhausted(training_id, f"training {training_id}: release refused: {reason}")]


def redis_memory(used_bytes: int, maxmemory_bytes: int,
                 fraction: float = REDIS_MEMORY_FRACTION) -> list[Condition]:
    """Warn when Redis uses at least ``fraction`` of maxmemory; maxmemory 0 means unlimited."""
    _check_fraction("fraction", fraction)
    if maxmemory_bytes <= 0 or used_bytes < fraction * maxmemory_bytes:
        return []
    return [Condition(
        key="redis_memory", rule="redis_memory", severity=Severity.WARNING,
        message=f"Redis uses {used_bytes / 2**20:.1f} MiB of its {maxmemory_bytes / 2**20:.1f} MiB "
                f"maxmemory ({used_bytes / maxmemory_bytes:.0%})",
        action="delete finished trainings' data, trim long streams, or raise maxmemory; at the "
               "limit Redis refuses writes and rounds stall",
    )]


def pending_backlog(pending: Mapping[str, int], limit: int = PENDING_BACKLOG_LIMIT) -> list[Condition]:
    """Warn for each stream/group whose pending (delivered, unacknowledged) count is >= ``limit``."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1; got {limit}")
    return [
        Condition(
            key=f"pending_backlog:{name}", rule="pending_backlog", severity=Severity.WARNING,
            message=f"{name} has {count} pending messages (limit {limit})",
            action=f"check that the consumers of {name} are alive and keeping up; add workers or "
                   "find the message that keeps failing in their log",
        )
        for name, count in sorted(pending.items()) if count >= limit
    ]


@dataclass(frozen=True)
class ProcessUsage:
    """A process's resource use: CPU as percent of one core (above 100 when it keeps several
    cores busy), memory as percent of RAM."""

    name: str
    cpu_percent: float
    memory_percent: float


def process_usages(health_records: Iterable[Mapping[str, object]]) -> list[ProcessUsage]:
    """The usage in each service health record that carries one, named ``<service>/<instance>``."""
    usages = []
    for record in health_records:
        cpu, memory = record.get("cpu_percent"), record.get("memory_percent")
        if isinstance(cpu, int | float) and isinstance(memory, int | float):
            usages.append(ProcessUsage(f"{record.get('service')}/{record.get('instance')}",
                                       float(cpu), float(memory)))
    return usages


def process_resources(usages: Iterable[ProcessUsage], cpu_limit: float = CPU_PERCENT_LIMIT,
                      memory_limit: float = MEMORY_PERCENT_LIMIT) -> list[Condition]:
    """Warn on CPU at or above ``cpu_limit``% of one core; critical on memory at or above
    ``memory_limit``% of RAM."""
    found = []
    for usage in sorted(usages, key=lambda u: u.name):
        if usage.cpu_percent >= cpu_limit:
            found.append(Condition(
                key=f"cpu_exhaustion:{usage.name}", rule="cpu_exhaustion", severity=Severity.WARNING,
                message=f"process {usage.name} uses {usage.cpu_percent:.0f}% of a CPU core "
                        f"(limit {cpu_limit:.0f}%)",
                action=f"check what {usage.name} is doing (a large aggregation, a busy loop) and whether "
                       "its streams back up; lower its thread count or move services to another machine",
            ))
        if usage.memory_percent >= memory_limit:
            found.append(Condition(
                key=f"memory_exhaustion:{usage.name}", rule="memory_exhaustion",
                severity=Severity.CRITICAL,
                message=f"process {usage.name} uses {usage.memory_percent:.0f}% of memory "
                        f"(limit {memory_limit:.0f}%)",
                action=f"restart {usage.name} before it is killed for memory, and reduce its load "
                       "(fewer agents per round, smaller models, streaming aggregation)",
            ))
    return found


HealthVerdict = Literal["healthy", "degraded", "critical"]


def health_verdict(conditions: Iterable[Condition]) -> tuple[HealthVerdict, list[str]]:
    """``critical`` if any condition is critical, ``degraded`` if there is any other, else
    ``healthy``; with the conditions' messages as reasons."""
    found = list(conditions)
    if any(c.severity == Severity.CRITICAL for c in found):
        return "critical", [c.message for c in found]
    return ("degraded" if found else "healthy"), [c.message for c in found]
