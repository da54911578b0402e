"""Transitions every kind of training shares: publishing a status, the next round or the final
evaluation, completing, finishing."""

from __future__ import annotations

from federated_learning.coordination.effects import (
    ActivateQueued,
    Effect,
    Emit,
    OpenRound,
    Save,
    StatusChanged,
)
from federated_learning.coordination.rounds import summarize_notices
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.protocol.messages import (
    Evaluation,
    Severity,
    TrainingStatus,
    UpdateSubmitted,
)

Transition = tuple[TrainingState, list[Effect]]


def status_changed(state: TrainingState, severity: Severity = Severity.INFO) -> StatusChanged:
    return StatusChanged(state.status, state.reason, state.round, severity)


def finish(state: TrainingState, status: TrainingStatus, reason: str) -> Transition:
    state.status, state.reason, state.phase = status, reason, RoundPhase.IDLE
    effects: list[Effect] = [Save(active=False), status_changed(
        state, Severity.INFO if status is TrainingStatus.COMPLETED else Severity.WARNING)]
    if status is TrainingStatus.COMPLETED:
        effects.append(Emit("training_completed", f"training completed after {state.completed_rounds} rounds",
                            data={"final_version": state.current_version,
                                  "final_evaluation": state.final_evaluation.model_dump()
                                  if state.final_evaluation else None}))
    effects.append(ActivateQueued())
    return state, effects


def after_round(state: TrainingState, eval_accuracy: float | None) -> Transition:
    """Open the next round: a training round, or the final evaluation once the rounds are done
    or the round's evaluation reached the target accuracy (a memory bank completes at once: it
    has no accuracy)."""
    target = state.config.target_accuracy
    reached = target is not None and (eval_accuracy or 0.0) >= target
    effects: list[Effect] = []
    if state.round >= state.config.rounds or reached:
        if state.config.kind == "memory_bank":
            return complete_evaluation(state, ())
        state.status = TrainingStatus.EVALUATING
        effects.append(status_changed(state))
    return state, [*effects, OpenRound(state.round + 1)]


def complete_evaluation(state: TrainingState, notices: tuple[UpdateSubmitted, ...]) -> Transition:
    summary = summarize_notices(list(notices))
    if summary["eval_accuracy"] is not None:
        state.final_evaluation = Evaluation(
            loss=float(summary["eval_loss"] or 0.0), accuracy=float(summary["eval_accuracy"]),
            num_examples=int(summary["eval_examples"] or 0))
    state.status = TrainingStatus.SAVING
    state.phase = RoundPhase.IDLE
    saving: list[Effect] = [Save(), status_changed(state)]
    state, effects = finish(state, TrainingStatus.COMPLETED, "")
    return state, [*saving, *effects]
