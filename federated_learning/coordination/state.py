"""The durable state of a training and of the agent registry, as stored in Redis (JSON)."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from federated_learning.access import DEFAULT_ORG, DEFAULT_PROJECT
from federated_learning.coordination.secure import SecureRoundState
from federated_learning.protocol.messages import (
    ASYNC_ALGORITHMS,
    Evaluation,
    RoundPhase,
    TrainingConfig,
    TrainingStatus,
)
from federated_learning.protocol.trainings import TrainingView

__all__ = ["RoundPhase", "TrainingState"]

DEFAULT_BUFFER_SIZE = 10
"""FedBuff's buffer size when the training names none (the aggregation rule's default)."""


class TrainingState(BaseModel):
    """Everything the coordinator must remember about one training across restarts."""

    model_config = ConfigDict(extra="forbid")

    training_id: str
    config: TrainingConfig
    org_id: str = DEFAULT_ORG
    project_id: str = DEFAULT_PROJECT
    status: TrainingStatus = TrainingStatus.CREATED
    reason: str = ""
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    min_clients: int
    clients_per_round: int
    round_deadline_s: float
    privacy_level: str
    clip_norm: float | None = None
    """L2 bound of each agent's update (agents clip to it); set when the privacy level needs it."""

    layer_spec: dict[str, tuple[tuple[int, ...], str]] = Field(default_factory=dict)
    current_version: int | None = None
    current_digest: str | None = None
    state_digest: str | None = None

    round: int = 0
    attempt: int = 0
    phase: RoundPhase = RoundPhase.IDLE
    selected: list[str] = Field(default_factory=list)
    responded: list[str] = Field(default_factory=list)
    """Agents that answered this round. As stored, it may omit agents whose update of the round
    was accepted (and ``selected`` the volunteers among them): accepting an update does not
    rewrite the state; ``restore_accepted`` puts them back when the state is loaded."""
    dropped: list[str] = Field(default_factory=list)
    in_flight: dict[str, float] = Field(default_factory=dict)
    """Asynchronous trainings: agent -> deadline of the task it is working on."""
    silent_volunteers: list[str] = Field(default_factory=list)
    """Volunteers (HTTP clients) that let the last round they were waited for close without their
    update: rounds stop waiting for them until they send one again."""
    retries: int = 0
    aggregation_attempts: int = 0
    in_flight_attempt: dict[str, int] = Field(default_factory=dict)
    """Asynchronous trainings: agent -> attempt number of its task in flight."""
    round_started_at: float = 0.0
    deadline_at: float = 0.0

    completed_rounds: int = 0
    best_accuracy: float | None = None
    final_evaluation: Evaluation | None = None
    epsilon_spent: float = 0.0
    last_rollback_at_version: int | None = None
    """Newest version already judged when the last automatic rollback was decided."""
    pending_rollback: int | None = None
    """A manual rollback asked while a round was aggregating: applied when it completes."""
    handled_requests: list[str] = Field(default_factory=list)
    """Control entries (operator rollbacks) already applied, newest last: redeliveries skip them."""
    secure: SecureRoundState | None = None
    """Secure trainings: the current round's masking exchange."""

    @property
    def is_active(self) -> bool:
        """Holds one of the concurrency slots."""
        return self.status in (
            TrainingStatus.CREATED, TrainingStatus.INITIALIZING, TrainingStatus.RUNNING,
            TrainingStatus.PAUSED, TrainingStatus.EVALUATING, TrainingStatus.SAVING,
        )

    @property
    def is_buffered(self) -> bool:
        """Trains buffered-asynchronously (FedBuff) rather than in synchronous rounds."""
        return self.config.algorithm in ASYNC_ALGORITHMS

    @property
    def buffer_size(self) -> int:
        return int(self.config.algorithm_params.get("buffer_size", DEFAULT_BUFFER_SIZE))

    @property
    def project(self) -> tuple[str, str]:
        """(organisation, project) that owns the training; only agents of that project take part."""
        return self.org_id, self.project_id

    def touch(self) -> None:
        self.updated_at = time.time()

    def view(self) -> TrainingView:
        """What the coordinator publishes of this state for REST and the other services."""
        return TrainingView.model_validate(self.model_dump(include=set(TrainingView.model_fields) - {"schema_version"}))

    def restore_accepted(self, accepted: list[str]) -> None:
        """Count the agents whose update of the current round is accepted as having answered (and
        as selected: volunteers are selected when their update is taken)."""
        missing = [agent for agent in accepted if agent not in self.responded]
        if missing:
            self.responded.extend(missing)
            self.selected = sorted(set(self.selected) | set(missing))

    def copy_for_update(self) -> TrainingState:
        """A copy whose changes never reach this state: containers are copied one level down,
        mutable models (the secure exchange) deeply; the frozen config is shared. A tenth of
        the cost of a deep copy, which a state machine step pays once per input."""
        copy = self.model_copy()
        for name, value in self.__dict__.items():
            if isinstance(value, list | dict):
                copy.__dict__[name] = value.copy()
            elif isinstance(value, BaseModel) and not value.model_config.get("frozen", False):
                copy.__dict__[name] = value.model_copy(deep=True)
        return copy
