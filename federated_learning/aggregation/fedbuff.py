"""FedBuff: buffered asynchronous aggregation with a staleness discount.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", 2021,
arXiv:2106.06639.

Agents train from whatever version is current and send their model *delta*
Delta_k = (local model after training) - (the version they started from); the aggregator
computes it when it holds the base version. A buffer of K deltas is folded in as
    w <- w + server_learning_rate * sum_k (n_k / sum n) * s(tau_k) * Delta_k,
with s(tau) = 1 / sqrt(1 + tau) and tau_k the number of versions published since client
k's base. The discount is not renormalised, so a stale buffer moves the model less.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from .base import Strategy, UpdateBatch, check_int, check_learning_rate, example_weights
from .fedavg import weighted_combination


def staleness_discount(staleness: NDArray[np.int64]) -> NDArray[np.float64]:
    """s(tau) = 1 / sqrt(1 + tau), elementwise, float64."""
    return 1.0 / np.sqrt(1.0 + staleness.astype(np.float64))


class FedBuff(Strategy):
    """Fold a buffer of up to ``buffer_size`` staleness-discounted deltas into the model."""

    name: ClassVar[str] = "fedbuff"
    checks_global_in_kernel: ClassVar[bool] = True
    reads_client_arrays: ClassVar[bool] = True

    def __init__(self, *, buffer_size: int = 10, server_learning_rate: float = 1.0) -> None:
        self.buffer_size = check_int(self.name, "buffer_size", buffer_size, 1)
        self.server_learning_rate = check_learning_rate(self.name, server_learning_rate)

    def params(self) -> dict[str, object]:
        return {"buffer_size": self.buffer_size, "server_learning_rate": self.server_learning_rate}

    def check_batch(self, batch: UpdateBatch) -> None:
        if batch.num_clients > self.buffer_size:
            raise ValueError(
                f"{self.name} buffer holds at most {self.buffer_size} updates; "
                f"got {batch.num_clients}"
            )

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        weights = example_weights(batch.num_examples) * staleness_discount(batch.staleness)
        return weighted_combination(
            batch, weights, scale=self.server_learning_rate, base_coef=1.0, rule=self.name
        )
