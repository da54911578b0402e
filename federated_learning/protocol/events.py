"""Events on the event stream, and the data of each kind as a typed model.

An :class:`Event` of a kind named in :data:`EVENT_DATA` is validated
against its model when it is built (so a producer cannot publish a malformed one) and when it
is decoded (so a consumer never reads one): consumers read ``event.payload(Model)`` instead of
picking keys out of a dict. Kinds not named here carry no data beyond the event's own fields,
or data only people read (shown on the dashboard as it is).
"""

from __future__ import annotations

import builtins
import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from federated_learning.protocol.messages import (
    FiniteFloat,
    Message,
    PrivacyReport,
    RoundFigures,
    Severity,
    TrainingStatus,
)


class EventData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoundStarted(EventData):
    """``round_started`` and ``round_retried``: agents asked for a round attempt."""

    attempt: int = Field(ge=1)
    selected: int = Field(ge=0)
    eligible: int = Field(ge=0)


class RoundClosed(EventData):
    """``round_closed``: the aggregation job is written."""

    updates: int = Field(ge=1)
    attempt: int = Field(ge=1)


class RoundCompleted(RoundFigures):
    """``round_completed``: the round's figures (its training and round are the event's own)."""


class TrainingStatusChanged(EventData):
    """``training_status``: the status the training moved to, with its reason."""

    status: TrainingStatus
    reason: str = ""


class TrainingCompleted(EventData):
    final_version: int | None
    final_evaluation: dict[str, float] | None


class RolledBack(EventData):
    """``rollback``: an earlier version became current."""

    from_version: int | None
    to_version: int
    automatic: bool
    reason: str
    at: float


class UpdateFlagged(EventData):
    """One agent's update statistics in an ``update_anomaly`` event."""

    agent_id: str
    norm: FiniteFloat
    norm_z: FiniteFloat
    cosine: FiniteFloat
    cosine_z: FiniteFloat
    reasons: tuple[str, ...] = ()


class UpdateAnomaly(EventData):
    """``update_anomaly``: the round's suspicious updates (scored after the version is committed)."""

    flags: list[UpdateFlagged] = Field(max_length=100_000)


class ModelReleasedEvent(PrivacyReport):
    """``model_released``: the privacy manager's report of the release."""


class InputRejected(EventData):
    """``input_rejected``: a refused input, counted as ``<source_stream>:<reason>``; further fields
    give its context (the stream, the forged id...)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    source_stream: str
    reason: str


class AggregationFailed(EventData):
    attempt: int = Field(ge=1)


EVENT_DATA: dict[str, type[BaseModel]] = {
    "round_started": RoundStarted,
    "round_retried": RoundStarted,
    "round_closed": RoundClosed,
    "round_completed": RoundCompleted,
    "training_status": TrainingStatusChanged,
    "training_completed": TrainingCompleted,
    "rollback": RolledBack,
    "update_anomaly": UpdateAnomaly,
    "model_released": ModelReleasedEvent,
    "input_rejected": InputRejected,
    "aggregation_failed": AggregationFailed,
}
"""Kinds whose data has a model (the consumers read these)."""

D = TypeVar("D", bound=BaseModel)


class Event(Message):
    """Something that happened, for the monitor, the dashboard and people."""

    type: Literal["event"] = "event"
    kind: str = Field(min_length=1, max_length=64)
    source: str = Field(min_length=1, max_length=64)
    severity: Severity = Severity.INFO
    message: str = Field(default="", max_length=2000)
    training_id: str | None = None
    round: int | None = None
    agent_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _data_of_its_kind(self) -> Event:
        model = EVENT_DATA.get(self.kind)
        if model is not None:
            model.model_validate(self.data)
        return self

    def payload(self, model: builtins.type[D]) -> D:
        """The event's data as ``model`` (the kind's entry in :data:`EVENT_DATA`)."""
        return model.model_validate(self.data)
