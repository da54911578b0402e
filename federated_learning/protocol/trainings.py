"""The published view of a training: what REST and the other services may read of it.

The coordinator keeps its own state (``coordination/state.py``: who was asked, retries, the
secure exchange, tasks in flight, handled requests) and writes this view with it, in the same
transaction, whenever the state is saved. Readers depend on this contract only, so the
coordinator's internal state can change without them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from federated_learning.protocol.messages import (
    ASYNC_ALGORITHMS,
    Evaluation,
    RoundPhase,
    TrainingConfig,
    TrainingStatus,
)

TRAINING_VIEW_SCHEMA: Literal[1] = 1


class TrainingView(BaseModel):
    """A training as its coordinator last saved it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = TRAINING_VIEW_SCHEMA
    training_id: str
    config: TrainingConfig
    org_id: str
    project_id: str
    status: TrainingStatus
    reason: str
    created_at: float
    updated_at: float

    min_clients: int
    clients_per_round: int
    round_deadline_s: float
    privacy_level: str
    clip_norm: float | None
    """L2 (or L1) bound of each agent's update, when the privacy level or secure aggregation needs one."""
    layer_spec: dict[str, tuple[tuple[int, ...], str]]
    """The model's layers once version 0 is fixed: name -> (shape, dtype)."""
    current_version: int | None
    current_digest: str | None
    pending_rollback: int | None
    """A rollback an operator asked for while a round was aggregating, applied when it completes."""

    round: int
    attempt: int
    phase: RoundPhase
    selected: list[str]
    """Agents asked in the current round (and volunteers whose update it took)."""
    responded: list[str]
    """Of those, the ones that answered, as of the last save (accepted updates are not saved one by one)."""
    round_started_at: float
    deadline_at: float

    completed_rounds: int
    best_accuracy: float | None
    final_evaluation: Evaluation | None
    epsilon_spent: float

    @property
    def is_buffered(self) -> bool:
        """Trains buffered-asynchronously (FedBuff) rather than in synchronous rounds."""
        return self.config.algorithm in ASYNC_ALGORITHMS

    @property
    def project(self) -> tuple[str, str]:
        """(organisation, project) that owns the training."""
        return self.org_id, self.project_id
