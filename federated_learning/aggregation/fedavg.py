"""FedAvg, FedProx and FedSGD, and the weighted-sum kernel the other averaging rules share.

- FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", 2016, arXiv:1602.05629. New model = sum_k (n_k / n) w_k.
- FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", 2018,
  arXiv:1812.06127. The server side is FedAvg; ``proximal_mu`` is the weight of the
  proximal term (mu/2)||w - w_t||^2 in each agent's local objective.
- FedSGD (same paper as FedAvg): agents send gradients g_k; the server steps
  w <- w - lr * sum_k (n_k / n) g_k.
"""

from __future__ import annotations

from typing import ClassVar

import numba
import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from .base import (
    Slab,
    Strategy,
    UpdateBatch,
    all_finite,
    check_learning_rate,
    check_real,
    example_weights,
    outputs_like,
    raise_non_finite_input,
    slab_dtype,
)

WEIGHTED_SUM_BLOCK = 4096


OUTPUT_NOT_FINITE = 1
BASE_NOT_FINITE = 2


@njit(parallel=True, cache=True, nogil=True)
def weighted_sum_affine(  # type: ignore[no-untyped-def]
    slab, rows, weights, base, scale, base_coef, out, num_threads
):
    """out[c] = scale * sum_j weights[j] * slab[rows[j], c] + base_coef * base[c].

    slab: (K, d) float32/float64, C-contiguous; rows: (m,) int64 row indices; weights:
    (m,) float64; base, out: (d,); num_threads: how many tasks (one float64 accumulator
    block each, allocated once) to split the blocks among. Each coordinate is summed over
    j in order, in float64, by one thread, so the result does not depend on the thread
    count. Returns a bit set: OUTPUT_NOT_FINITE when an output is NaN or Inf,
    BASE_NOT_FINITE when an entry of base is. Checking base here, block by block while
    it is in cache and on every thread, replaces a serial pass over the global model.
    """
    d = slab.shape[1]
    m = rows.size
    num_blocks = (d + WEIGHTED_SUM_BLOCK - 1) // WEIGHTED_SUM_BLOCK
    num_tasks = max(1, min(num_blocks, num_threads))
    status = np.zeros(num_tasks, np.int64)
    for task in prange(num_tasks):
        acc = np.empty(WEIGHTED_SUM_BLOCK, np.float64)
        for b in range(task * num_blocks // num_tasks, (task + 1) * num_blocks // num_tasks):
            c0 = b * WEIGHTED_SUM_BLOCK
            n = min(d, c0 + WEIGHTED_SUM_BLOCK) - c0
            acc[:n] = 0.0
            # Four rows per pass: four concurrent read streams, and acc is loaded and
            # stored once per four rows instead of once per row.
            j = 0
            while j + 4 <= m:
                r0, r1, r2, r3 = rows[j], rows[j + 1], rows[j + 2], rows[j + 3]
                w0, w1, w2, w3 = weights[j], weights[j + 1], weights[j + 2], weights[j + 3]
                for c in range(n):
                    acc[c] += (w0 * slab[r0, c0 + c] + w1 * slab[r1, c0 + c]) + (
                        w2 * slab[r2, c0 + c] + w3 * slab[r3, c0 + c]
                    )
                j += 4
            while j < m:
                r0 = rows[j]
                w0 = weights[j]
                for c in range(n):
                    acc[c] += w0 * slab[r0, c0 + c]
                j += 1
            if base_coef == 0.0:
                for c in range(n):
                    out[c0 + c] = scale * acc[c]
            else:
                for c in range(n):
                    out[c0 + c] = scale * acc[c] + base_coef * base[c0 + c]
            if not all_finite(out[c0 : c0 + n]):
                status[task] |= OUTPUT_NOT_FINITE
            if not all_finite(base[c0 : c0 + n]):
                status[task] |= BASE_NOT_FINITE
    flags = 0
    for task in range(num_tasks):
        flags |= status[task]
    return flags


def flat_base(layer: NDArray[np.generic]) -> NDArray[np.floating]:
    """The global layer as a flat float32/float64 vector (a view when it already is one)."""
    return np.ascontiguousarray(np.reshape(layer, -1), dtype=slab_dtype(layer))


def weighted_combination(
    batch: UpdateBatch,
    weights: NDArray[np.float64],
    *,
    scale: float = 1.0,
    base_coef: float = 0.0,
    rows: NDArray[np.int64] | None = None,
    rule: str = "fedavg",
    outputs: list[NDArray[np.floating]] | None = None,
) -> list[NDArray[np.floating]]:
    """Per layer: ``scale * sum_j weights[j] * update[rows[j]] + base_coef * global``.

    outputs: flat per-layer arrays to write into (``outputs_like``); fresh ones when None.

    Raises ValueError when a global layer holds NaN/Inf (checked inside the kernel, so
    rules that call this for every layer set ``Strategy.checks_global_in_kernel``) or an
    update does: with weights > 0 (or any weight, as 0 * NaN is NaN) a non-finite input
    always reaches the output, so checking the O(d) output is equivalent to checking
    the O(K d) inputs.
    """
    chosen = np.arange(batch.num_clients, dtype=np.int64) if rows is None else rows
    threads = numba.get_num_threads()
    targets = outputs or outputs_like(batch.global_layers)
    for i, (slab, layer, out) in enumerate(
        zip(batch.slabs, batch.global_layers, targets, strict=True)
    ):
        flags = weighted_sum_affine(
            slab, chosen, weights, flat_base(layer), float(scale), float(base_coef), out, threads
        )
        if flags & BASE_NOT_FINITE:
            raise ValueError(f"global layer {i} contains NaN or Inf")
        if flags & OUTPUT_NOT_FINITE:
            raise_non_finite_input(batch, rule)
    return targets


def fedavg(slabs: list[Slab], weights: NDArray[np.float64]) -> list[NDArray[np.floating]]:
    """Weighted mean of every layer's rows: ``sum_k weights[k] * slabs[i][k]`` (no checks)."""
    rows = np.arange(slabs[0].shape[0], dtype=np.int64)
    outputs = []
    for slab in slabs:
        out = np.empty(slab.shape[1], slab.dtype)
        weighted_sum_affine(slab, rows, weights, out, 1.0, 0.0, out, numba.get_num_threads())
        outputs.append(out)
    return outputs


class FedAvg(Strategy):
    """Example-weighted mean of the clients' models (Flower's FedAvg)."""

    name: ClassVar[str] = "fedavg"
    checks_global_in_kernel: ClassVar[bool] = True

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        return weighted_combination(batch, example_weights(batch.num_examples), rule=self.name)


class FedProx(FedAvg):
    """FedAvg on the server; ``proximal_mu`` is sent to the agents' local objective."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, proximal_mu: float) -> None:
        self.proximal_mu = check_real(
            self.name, "proximal_mu", proximal_mu, 0.0, float("inf"), low_open=False, high_open=True
        )

    def params(self) -> dict[str, object]:
        return {"proximal_mu": self.proximal_mu}


class FedSGD(Strategy):
    """Clients send gradients; the server takes one SGD step on their weighted mean."""

    name: ClassVar[str] = "fedsgd"
    checks_global_in_kernel: ClassVar[bool] = True

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        self.server_learning_rate = check_learning_rate(self.name, server_learning_rate)

    def params(self) -> dict[str, object]:
        return {"server_learning_rate": self.server_learning_rate}

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        weights = example_weights(batch.num_examples)
        return weighted_combination(
            batch, weights, scale=-self.server_learning_rate, base_coef=1.0, rule=self.name
        )
