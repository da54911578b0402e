"""Rollbacks inside the coordinator: the automatic policy after each round, and operator requests.

The policy itself is pure (:mod:`federated_learning.versioning.rollback`); this module feeds
it the federated evaluations of each version (reported by the agents at the start of the
next round) and moves the training's current version back to the chosen one. Versions
are never deleted or renumbered: the next round's version names the target as its parent.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import Counter

from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.protocol.messages import (
    RollbackTraining,
    RoundMetrics,
    Severity,
    TrainingStatus,
)
from federated_learning.records.versions import VersionIndex
from federated_learning.versioning.rollback import VersionScore, judge

if TYPE_CHECKING:
    from federated_learning.services.coordinator import Coordinator


ROLLBACKS = Counter("fl_rollbacks_total", "Rollbacks to an earlier version", ["trigger"])
HANDLED_REQUESTS_KEPT = 50
"""Operator requests remembered per training (redeliveries come soon after a crash)."""


def version_scores(metrics: list[RoundMetrics]) -> list[VersionScore]:
    """One score per evaluated version, in version order.

    With a server-side validation set every version is scored on it as soon as it is
    committed (one fixed data set); otherwise by the agents' evaluation of it, which
    arrives with the next round (its first one counts).
    """
    server = {row.version: row for row in metrics if row.server_accuracy is not None}
    if server:
        return [VersionScore(v, row.server_accuracy or 0.0, row.server_loss,
                             server_accuracy=row.server_accuracy) for v, row in sorted(server.items())]
    scores: dict[int, VersionScore] = {}
    for row in metrics:
        if row.eval_of_version is not None and row.eval_accuracy is not None:
            scores.setdefault(row.eval_of_version, VersionScore(row.eval_of_version, row.eval_accuracy,
                                                                row.eval_loss))
    return [scores[v] for v in sorted(scores)]


class Rollbacks:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self.index = VersionIndex(coordinator.redis, coordinator.keys)

    async def after_round(self, state: TrainingState) -> None:
        """Apply the training's automatic policy to the evaluations so far."""
        config = state.config.rollback
        if config is None or not config.enabled:
            return
        history = version_scores(await self.c.store.metrics(state.training_id))
        decision = judge(history, config, state.last_rollback_at_version)
        if decision is None:
            return
        state.last_rollback_at_version = history[-1].version
        await self.move_to(state, decision.target_version, decision.reason, automatic=True)

    async def move_to(self, state: TrainingState, version: int, reason: str, *, automatic: bool) -> bool:
        """Make ``version`` the training's current version; False when it does not exist."""
        record = await self.index.get(state.training_id, version)
        if record is None:
            return False
        previous = state.current_version
        ROLLBACKS.labels("automatic" if automatic else "operator").inc()
        state.current_version = record.version
        state.current_digest = record.model_digest
        state.state_digest = record.state_digest
        await self.c.store.save(state)
        await self.c.ctx.emit(
            "rollback", f"rolled back from version {previous} to {version}: {reason}",
            severity=Severity.WARNING, training_id=state.training_id, round=state.round,
            from_version=previous, to_version=version, automatic=automatic, reason=reason, at=time.time())
        return True

    async def on_request(self, command: RollbackTraining, request_id: str) -> None:
        """An operator's rollback: restart a collecting round from the target, or defer it.

        ``request_id`` (the control entry's id) is saved with the first state change, so a
        redelivered request is not applied twice (it would skip a round number)."""
        state = await self.c.store.load(command.training_id)
        if state is not None and request_id in state.handled_requests:
            return
        if state is None or state.status.is_final:
            await self.c.ctx.reject("control", "unknown_training", f"no running training '{command.training_id}'",
                                    training_id=command.training_id)
            return
        if await self.index.get(state.training_id, command.version) is None:
            await self.c.ctx.reject("control", "unknown_version",
                                    f"training has no version {command.version}", training_id=state.training_id)
            return
        state.handled_requests = [*state.handled_requests, request_id][-HANDLED_REQUESTS_KEPT:]
        if state.phase is RoundPhase.AGGREGATING:
            state.pending_rollback = command.version
            await self.c.store.save(state)
            return
        await self.move_to(state, command.version, command.reason, automatic=False)
        if state.phase is RoundPhase.COLLECTING and state.status is TrainingStatus.RUNNING and not state.is_buffered:
            # Updates trained on the old model do not belong to this round any more.
            await self.c.redis.delete(self.c.keys.round_updates(state.training_id, state.round))
            await self.c.open_round(state, state.round + 1)
