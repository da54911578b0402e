"""Rollbacks as transitions of the coordinator's state machine: the automatic policy after
each round, and operator requests.

The policy itself is :func:`federated_learning.versioning.rollback.judge`; it is fed the
evaluations of each version. A rollback makes an earlier version current again. Versions
are never deleted or renumbered: the next round's version names the target as its parent.
"""

from __future__ import annotations

from collections.abc import Sequence

from federated_learning.coordination.effects import (
    ClearRoundUpdates,
    Effect,
    OpenRound,
    ReadVersion,
    Reject,
    RolledBack,
    Save,
)
from federated_learning.coordination.inputs import RollbackRequested, RollbackTarget, VersionsScored
from federated_learning.coordination.lifecycle import after_round
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.protocol.messages import RoundMetrics, TrainingStatus, VersionRecord
from federated_learning.versioning.rollback import VersionScore, judge

Transition = tuple[TrainingState, list[Effect]]

HANDLED_REQUESTS_KEPT = 50
"""Operator requests remembered per training (redeliveries come soon after a crash)."""


def version_scores(metrics: Sequence[RoundMetrics]) -> list[VersionScore]:
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


def move_to(state: TrainingState, record: VersionRecord, reason: str, *, automatic: bool) -> list[Effect]:
    """Make ``record`` the training's current version."""
    previous = state.current_version
    state.current_version = record.version
    state.current_digest = record.model_digest
    state.state_digest = record.state_digest
    return [Save(), RolledBack(previous, record.version, reason, automatic)]


def judge_versions(state: TrainingState, given: VersionsScored) -> Transition:
    """Apply the training's automatic policy to the evaluations so far."""
    config = state.config.rollback
    decision = None if config is None or not config.enabled or not given.scores else \
        judge(list(given.scores), config, state.last_rollback_at_version)
    if decision is None:
        return after_round(state, given.eval_accuracy)
    state.last_rollback_at_version = given.scores[-1].version
    return state, [ReadVersion(decision.target_version, decision.reason, automatic=True,
                               eval_accuracy=given.eval_accuracy)]


def roll_back_after_round(state: TrainingState, given: RollbackTarget) -> Transition:
    """The version chosen after a round (by the policy, or an operator's deferred request)
    becomes current; then the next round opens from it."""
    if not given.automatic:
        state.pending_rollback = None
    effects = move_to(state, given.record, given.reason, automatic=given.automatic) if given.record else [Save()]
    state, more = after_round(state, given.eval_accuracy)
    return state, [*effects, *more]


def request(state: TrainingState, given: RollbackRequested) -> Transition:
    """An operator's rollback: restart a collecting round from the target, or defer it until the
    aggregating round completes. The request's entry id is saved with the first state change,
    so a redelivered request is not applied twice (it would skip a round number)."""
    command = given.command
    if given.request_id in state.handled_requests:
        return state, []
    if state.status.is_final:
        return state, [Reject("control", "unknown_training", f"no running training '{command.training_id}'",
                              command.training_id)]
    if given.record is None:
        return state, [Reject("control", "unknown_version", f"training has no version {command.version}",
                              state.training_id)]
    state.handled_requests = [*state.handled_requests, given.request_id][-HANDLED_REQUESTS_KEPT:]
    if state.phase is RoundPhase.AGGREGATING:
        state.pending_rollback = command.version
        return state, [Save()]
    effects = move_to(state, given.record, command.reason, automatic=False)
    if state.phase is RoundPhase.COLLECTING and state.status is TrainingStatus.RUNNING and not state.is_buffered:
        # Updates trained on the old model do not belong to this round any more.
        effects += [ClearRoundUpdates(state.round), OpenRound(state.round + 1)]
    return state, effects
