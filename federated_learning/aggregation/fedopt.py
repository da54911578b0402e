"""FedAdam, FedYogi and FedAdagrad: adaptive server optimisers, as in Flower's FedOpt family.

Reddi et al., "Adaptive Federated Optimization", 2020, arXiv:2003.00295.

With delta = fedavg(clients) - w_t (example-weighted mean of the new local models):
    m <- beta_1 * m + (1 - beta_1) * delta
    v <- beta_2 * v + (1 - beta_2) * delta^2                          (Adam)
    v <- v - (1 - beta_2) * delta^2 * sign(v - delta^2)                (Yogi)
    v <- v + delta^2                                                   (Adagrad, beta_1 = 0)
    w_{t+1} = w_t + eta_t * m / (sqrt(v) + tau)
m and v start at zero. eta_t = eta for Yogi and Adagrad; Flower's FedAdam uses the
bias-corrected eta_t = eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1)) with t the server
round counted from 1, so we keep the round count in the state. ``eta_l`` is the clients'
learning rate; the server only carries it to the agents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from .base import Strategy, UpdateBatch, check_real, example_weights
from .fedavg import flat_base, weighted_combination
from .state import check_state_shapes, pack_state, unpack_state

ADAM = 0
YOGI = 1
ADAGRAD = 2


@njit(parallel=True, cache=True, nogil=True)
def fedopt_step(  # type: ignore[no-untyped-def]
    current,
    delta,
    m,
    v,
    rule,
    beta_1,
    beta_2,
    eta,
    tau,
):
    """In place, fused: update moments m, v from delta, then overwrite delta with w_{t+1}.

    current, delta, m, v: (d,) float32/float64; rule: ADAM, YOGI or ADAGRAD; the
    arithmetic is float64 and m, v are rounded to their own dtype when stored.
    """
    for c in prange(current.size):
        g = np.float64(delta[c])
        g2 = g * g
        mc = beta_1 * m[c] + (1.0 - beta_1) * g
        vc = np.float64(v[c])
        if rule == ADAM:
            vc = beta_2 * vc + (1.0 - beta_2) * g2
        elif rule == YOGI:
            vc = vc - (1.0 - beta_2) * g2 * np.sign(vc - g2)
        else:
            vc = vc + g2
        m[c] = mc
        v[c] = vc
        delta[c] = current[c] + eta * mc / (np.sqrt(vc) + tau)


class FedOpt(Strategy):
    """Shared machinery of the adaptive server optimisers; not registered itself."""

    rule: ClassVar[int]
    checks_global_in_kernel: ClassVar[bool] = True
    reads_client_arrays: ClassVar[bool] = True

    def __init__(
        self, *, eta: float, eta_l: float, beta_1: float, beta_2: float, tau: float
    ) -> None:
        positive = {"low_open": True, "high_open": True}
        self.eta = check_real(self.name, "eta", eta, 0.0, float("inf"), **positive)
        self.eta_l = check_real(self.name, "eta_l", eta_l, 0.0, float("inf"), **positive)
        self.beta_1 = check_real(
            self.name, "beta_1", beta_1, 0.0, 1.0, low_open=False, high_open=True
        )
        self.beta_2 = check_real(
            self.name, "beta_2", beta_2, 0.0, 1.0, low_open=False, high_open=True
        )
        self.tau = check_real(self.name, "tau", tau, 0.0, float("inf"), **positive)
        self.m: list[NDArray[np.floating]] = []
        self.v: list[NDArray[np.floating]] = []
        self.server_round = 0

    def params(self) -> dict[str, object]:
        return {
            "eta": self.eta,
            "eta_l": self.eta_l,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "tau": self.tau,
        }

    def step_size(self, server_round: int) -> float:
        """Server learning rate of round ``server_round`` (counted from 1)."""
        return self.eta

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        weights = example_weights(batch.num_examples)
        deltas = weighted_combination(batch, weights, base_coef=-1.0, rule=self.name)
        if not self.m:
            self.m = [np.zeros_like(delta) for delta in deltas]
            self.v = [np.zeros_like(delta) for delta in deltas]
        check_state_shapes(self.m, deltas, self.name)
        check_state_shapes(self.v, deltas, self.name)
        self.server_round += 1
        eta = self.step_size(self.server_round)
        for delta, m, v, layer in zip(deltas, self.m, self.v, batch.global_layers, strict=True):
            fedopt_step(
                flat_base(layer), delta, m, v, self.rule, self.beta_1, self.beta_2, eta, self.tau
            )
        return deltas

    def state_dict(self) -> dict[str, NDArray[np.generic]]:
        return pack_state({"m": self.m, "v": self.v}, {"server_round": self.server_round})

    def load_state_dict(self, state: Mapping[str, NDArray[np.generic]]) -> None:
        unpacked = unpack_state(state, ("m", "v"), ("server_round",), self.name)
        m, v = unpacked.layers["m"], unpacked.layers["v"]
        if len(m) != len(v):
            raise ValueError(f"{self.name} state has {len(m)} 'm' layers and {len(v)} 'v' layers")
        self.m, self.v = m, v
        self.server_round = unpacked.counters.get("server_round", 0)


class FedAdam(FedOpt):
    """Adam on the server (Flower's FedAdam, with its bias-corrected step size)."""

    name: ClassVar[str] = "fedadam"
    rule: ClassVar[int] = ADAM

    def __init__(
        self,
        *,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-9,
    ) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def step_size(self, server_round: int) -> float:
        """eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1)), Flower's exponent t + 1."""
        exponent = server_round + 1.0
        return float(
            self.eta * math.sqrt(1.0 - self.beta_2**exponent) / (1.0 - self.beta_1**exponent)
        )


class FedYogi(FedOpt):
    """Yogi on the server (Flower's FedYogi)."""

    name: ClassVar[str] = "fedyogi"
    rule: ClassVar[int] = YOGI

    def __init__(
        self,
        *,
        eta: float = 1e-2,
        eta_l: float = 0.0316,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)


class FedAdagrad(FedOpt):
    """Adagrad on the server (Flower's FedAdagrad: beta_1 = beta_2 = 0, not settable)."""

    name: ClassVar[str] = "fedadagrad"
    rule: ClassVar[int] = ADAGRAD

    def __init__(self, *, eta: float = 1e-1, eta_l: float = 1e-1, tau: float = 1e-9) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=0.0, beta_2=0.0, tau=tau)

    def params(self) -> dict[str, object]:
        return {"eta": self.eta, "eta_l": self.eta_l, "tau": self.tau}
