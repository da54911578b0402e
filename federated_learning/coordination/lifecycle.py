"""Transitions every kind of training shares: publishing a status, finishing."""

from __future__ import annotations

from federated_learning.coordination.effects import (
    ActivateQueued,
    Effect,
    Emit,
    Save,
    StatusChanged,
)
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.protocol.messages import Severity, TrainingStatus

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
