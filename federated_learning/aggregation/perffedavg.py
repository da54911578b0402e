"""Per-FedAvg server aggregation: weights mixing data size and client accuracy.

Fallah, Mokhtari and Ozdaglar, "Personalized Federated Learning: A Meta-Learning
Approach", 2020, arXiv:2002.07948. The agents run the MAML-style local steps; the server
averages their models with weight_k = alpha * n_k / sum n + (1 - alpha) * acc_k / sum acc,
where acc_k is client k's reported ``accuracy`` metric.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from .base import Strategy, UpdateBatch, check_real, example_weights
from .fedavg import weighted_combination

ACCURACY_METRIC = "accuracy"


def perffedavg_weights(
    num_examples: NDArray[np.int64], accuracies: NDArray[np.float64], alpha: float
) -> NDArray[np.float64]:
    """alpha * n_k / sum n + (1 - alpha) * acc_k / sum acc, in float64; sums to 1."""
    size_part = example_weights(num_examples)
    if alpha == 1.0:
        return size_part
    mixed = alpha * size_part + (1.0 - alpha) * (accuracies / accuracies.sum())
    return np.asarray(mixed, dtype=np.float64)


class PerFedAvg(Strategy):
    """Weighted mean whose weights blend example counts and reported accuracies."""

    name: ClassVar[str] = "perffedavg"
    checks_global_in_kernel: ClassVar[bool] = True
    reads_client_arrays: ClassVar[bool] = True

    def __init__(self, *, alpha: float = 0.5) -> None:
        self.alpha = check_real(
            self.name, "alpha", alpha, 0.0, 1.0, low_open=False, high_open=False
        )

    def params(self) -> dict[str, object]:
        return {"alpha": self.alpha}

    def accuracies(self, batch: UpdateBatch) -> NDArray[np.float64]:
        """Each client's ``accuracy`` metric, checked to be finite and >= 0 with a positive sum."""
        if batch.client_metrics is None:
            raise ValueError(f"{self.name} needs client_metrics with '{ACCURACY_METRIC}'")
        values = []
        for k, metrics in enumerate(batch.client_metrics):
            if ACCURACY_METRIC not in metrics:
                raise ValueError(f"{self.name}: client {k} reported no '{ACCURACY_METRIC}' metric")
            value = metrics[ACCURACY_METRIC]
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise ValueError(  # noqa: TRY004
                    f"{self.name}: client {k} accuracy must be a number; got {value!r}"
                )
            if not math.isfinite(float(value)) or value < 0:
                raise ValueError(
                    f"{self.name}: client {k} accuracy must be finite and >= 0; got {value}"
                )
            values.append(float(value))
        accuracies = np.asarray(values, dtype=np.float64)
        if self.alpha < 1.0 and accuracies.sum() <= 0.0:
            raise ValueError(f"{self.name} needs a positive sum of client accuracies; all are 0")
        return accuracies

    def check_batch(self, batch: UpdateBatch) -> None:
        self.accuracies(batch)

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        weights = perffedavg_weights(batch.num_examples, self.accuracies(batch), self.alpha)
        return weighted_combination(batch, weights, rule=self.name)
