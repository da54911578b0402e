"""FedAvgM: FedAvg with server momentum, as in Flower's FedAvgM.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019, arXiv:1909.06335.

pseudo_gradient = w_t - fedavg(clients); v <- momentum * v + pseudo_gradient (v starts at
zero, so round 1 gives v = pseudo_gradient as in Flower); w_{t+1} = w_t - lr * v. With
momentum 0 the rule keeps no state; with momentum 0 and lr 1 it is FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from .base import Strategy, UpdateBatch, check_learning_rate, check_real, example_weights
from .fedavg import flat_base, weighted_combination
from .state import check_state_shapes, pack_state, unpack_state


@njit(parallel=True, cache=True, nogil=True)
def momentum_step(  # type: ignore[no-untyped-def]
    current,
    delta,
    velocity,
    momentum,
    learning_rate,
):
    """In place: v = momentum * v - delta; delta <- current - lr * v (the new weights).

    current, delta, velocity: (d,) float32/float64; delta = fedavg - current, so
    -delta is Flower's pseudo-gradient.
    """
    for c in prange(current.size):
        v = momentum * velocity[c] - delta[c]
        velocity[c] = v
        delta[c] = current[c] - learning_rate * v


class FedAvgM(Strategy):
    """FedAvg followed by an SGD-with-momentum server step (Flower's FedAvgM)."""

    name: ClassVar[str] = "fedavgm"
    checks_global_in_kernel: ClassVar[bool] = True
    reads_client_arrays: ClassVar[bool] = True

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0) -> None:
        self.server_learning_rate = check_learning_rate(self.name, server_learning_rate)
        self.server_momentum = check_real(
            self.name, "server_momentum", server_momentum, 0.0, 1.0, low_open=False, high_open=True
        )
        self.velocity: list[NDArray[np.floating]] = []

    def params(self) -> dict[str, object]:
        return {
            "server_learning_rate": self.server_learning_rate,
            "server_momentum": self.server_momentum,
        }

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        weights = example_weights(batch.num_examples)
        lr = self.server_learning_rate
        if self.server_momentum == 0.0:
            return weighted_combination(
                batch, weights, scale=lr, base_coef=1.0 - lr, rule=self.name
            )
        deltas = weighted_combination(batch, weights, base_coef=-1.0, rule=self.name)
        if not self.velocity:
            self.velocity = [np.zeros_like(delta) for delta in deltas]
        check_state_shapes(self.velocity, deltas, self.name)
        for delta, velocity, layer in zip(deltas, self.velocity, batch.global_layers, strict=True):
            momentum_step(flat_base(layer), delta, velocity, self.server_momentum, lr)
        return deltas

    def state_dict(self) -> dict[str, NDArray[np.generic]]:
        return pack_state({"velocity": self.velocity}, {})

    def load_state_dict(self, state: Mapping[str, NDArray[np.generic]]) -> None:
        self.velocity = unpack_state(state, ("velocity",), (), self.name).layers["velocity"]
