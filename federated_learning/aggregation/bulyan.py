"""Bulyan: iterated Krum selection, then a coordinate-wise trimmed mean around the median.

El Mhamdi, Guerraoui and Rouault, "The Hidden Vulnerability of Distributed Learning in
Byzantium", 2018, arXiv:1802.07927.

As Flower's ``aggregate_bulyan`` with Krum as the first rule: with n updates and f
attackers (n >= 4f + 3), pick theta = n - 2f updates one at a time, each the Krum winner
(f attackers assumed) among those not yet picked; then, per coordinate, average the
beta = theta - 2f picked values closest to the picked values' median.
"""

from __future__ import annotations

from typing import ClassVar

import numba
import numpy as np
from numpy.typing import NDArray

from .base import (
    Strategy,
    UpdateBatch,
    check_int,
    output_buffer,
    outputs_like,
    raise_non_finite_input,
)
from .krum import checked_distances, krum_scores
from .order_statistics import NEAR_MEDIAN, coordinate_reduce, sorting_network


def mean_closest_to_median(
    slab: NDArray[np.floating],
    rows: NDArray[np.int64],
    beta: int,
    out: NDArray[np.floating],
    num_threads: int,
) -> bool:
    """out[c] = mean of the beta values of slab[rows, c] closest to their median.

    slab: (K, d) float32/float64, C-contiguous; rows: (theta,) int64; out: (d,) of slab's
    dtype; num_threads: how many workspaces (tasks) to use. In sorted order the beta
    nearest values form a window; the window whose farther end is nearest the median wins
    (the lower one on ties). Returns False on NaN/Inf input.
    """
    network = sorting_network(int(rows.size))
    return coordinate_reduce(slab, rows, network, NEAR_MEDIAN, beta, beta, out, num_threads)


def bulyan_selection(distances: NDArray[np.float64], num_malicious: int) -> NDArray[np.int64]:
    """The theta = n - 2f updates picked by iterated Krum, in the order they were picked."""
    remaining = list(range(distances.shape[0]))
    picked: list[int] = []
    for _ in range(distances.shape[0] - 2 * num_malicious):
        candidates = np.asarray(remaining, dtype=np.int64)
        scores = krum_scores(distances, candidates, num_malicious)
        picked.append(remaining.pop(int(np.argmin(scores))))
    return np.asarray(picked, dtype=np.int64)


class Bulyan(Strategy):
    """Iterated Krum, then the mean of the values nearest the coordinate-wise median."""

    name: ClassVar[str] = "bulyan"
    requires_individual_updates: ClassVar[bool] = True

    def __init__(self, *, num_malicious_clients: int = 0) -> None:
        self.num_malicious_clients = check_int(
            self.name, "num_malicious_clients", num_malicious_clients, 0
        )

    def params(self) -> dict[str, object]:
        return {"num_malicious_clients": self.num_malicious_clients}

    def check_batch(self, batch: UpdateBatch) -> None:
        f = self.num_malicious_clients
        if batch.num_clients < 4 * f + 3:
            raise ValueError(
                f"{self.name} needs at least 4*f+3 updates; got {batch.num_clients} with f={f}"
            )

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        f = self.num_malicious_clients
        outputs = outputs_like(batch.global_layers)
        picked = bulyan_selection(checked_distances(batch, self.name, output_buffer(outputs)), f)
        beta = picked.size - 2 * f
        threads = numba.get_num_threads()
        for slab, out in zip(batch.slabs, outputs, strict=True):
            if not mean_closest_to_median(slab, picked, beta, out, threads):
                raise_non_finite_input(batch, self.name)
        return outputs
