"""Training metrics as the monitor records them (seed 004's ``TrainingMetric``)."""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from federated_learning.protocol.events import RoundCompleted

METRIC_SERIES_MAXLEN = 100_000
"""Most metrics kept per training (the oldest go first)."""


class MetricType(StrEnum):
    ACCURACY = "accuracy"
    LOSS = "loss"
    ROUND_TIME = "round_time"
    PARTICIPATION = "participation"
    UPDATE_NORM = "update_norm"
    EPSILON_SPENT = "epsilon_spent"
    BYTES_RECEIVED = "bytes_received"


class TrainingMetric(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    training_id: str
    round_number: int = Field(ge=0)
    metric_type: MetricType
    value: float = Field(allow_inf_nan=False)
    timestamp: float = Field(default_factory=time.time)


def metrics_from_round(data: RoundCompleted, training_id: str, round_number: int) -> list[TrainingMetric]:
    """The TrainingMetrics a ``round_completed`` event carries: bytes received are the round's
    update uploads; the update norm is the aggregator's mean update norm (absent when the
    round's updates were not scored, e.g. secure rounds)."""
    pairs = [
        (MetricType.ACCURACY, data.eval_accuracy),
        (MetricType.LOSS, data.eval_loss),
        (MetricType.ROUND_TIME, data.round_seconds),
        (MetricType.PARTICIPATION, data.participants),
        (MetricType.EPSILON_SPENT, data.epsilon_spent),
        (MetricType.BYTES_RECEIVED, data.upload_bytes),
        (MetricType.UPDATE_NORM, data.update_norm_mean),
    ]
    return [TrainingMetric(training_id=training_id, round_number=round_number, metric_type=kind,
                           value=float(value))
            for kind, value in pairs if isinstance(value, int | float)]
