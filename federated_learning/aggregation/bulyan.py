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
from numba import njit, prange
from numpy.typing import NDArray

from .base import (
    Strategy,
    UpdateBatch,
    check_int,
    output_like,
    raise_non_finite_input,
)
from .krum import checked_distances, krum_scores
from .order_statistics import (
    BUFFER_STRIDE,
    LANES,
    ORDER_CHUNK,
    apply_network,
    as_bits,
    keys_to_bits,
    load_keys,
    order_key_constants,
    sorting_network,
)


@njit(cache=True, nogil=True)
def window_means(  # type: ignore[no-untyped-def]
    floats,
    offset,
    theta,
    half,
    beta,
    prefix,
    middle,
    best,
    best_sum,
):
    """best_sum[l] = sum of the beta sorted values nearest the median, column offset + l.

    floats: (theta, >= offset + LANES) sorted column-wise; prefix: (theta + 1, LANES)
    float64 scratch; middle, best, best_sum: (LANES,) float64.
    """
    for lane in range(LANES):
        if theta % 2 == 1:
            middle[lane] = floats[half, offset + lane]
        else:
            low = np.float64(floats[half - 1, offset + lane])
            middle[lane] = 0.5 * (low + floats[half, offset + lane])
        best[lane] = np.inf
    for j in range(theta):
        for lane in range(LANES):
            prefix[j + 1, lane] = prefix[j, lane] + floats[j, offset + lane]
    for s in range(theta - beta + 1):
        for lane in range(LANES):
            low_gap = middle[lane] - floats[s, offset + lane]
            high_gap = floats[s + beta - 1, offset + lane] - middle[lane]
            cost = max(low_gap, high_gap)
            if cost < best[lane]:
                best[lane] = cost
                best_sum[lane] = prefix[s + beta, lane] - prefix[s, lane]


@njit(parallel=True, cache=True, nogil=True)
def mean_closest_to_median(  # type: ignore[no-untyped-def]
    slab,
    bits,
    key,
    rows,
    first,
    second,
    beta,
    out,
    num_threads,
):
    """out[c] = mean of the beta values of slab[rows, c] closest to their median.

    slab: (K, d) float32/float64 and ``bits``, its memory as int32/int64; key:
    ``order_key_constants(slab.dtype)``; rows: (theta,) int64; first/second: a full
    sorting network for theta inputs; out: (d,); num_threads: how many per-thread
    buffers (tasks) to use, as in ``mean_of_ranks``. In sorted order the beta nearest values
    form a window; the window whose farther end is nearest the median wins (the lower one
    on ties), and its sum comes from float64 prefix sums. Returns False on NaN/Inf input.
    """
    d = slab.shape[1]
    theta = rows.size
    half = theta // 2
    num_chunks = (d + ORDER_CHUNK - 1) // ORDER_CHUNK
    num_tasks = max(1, min(num_chunks, num_threads))
    finite = np.ones(num_tasks, np.bool_)
    for task in prange(num_tasks):
        buffer = np.empty((theta, BUFFER_STRIDE), bits.dtype)
        floats = buffer.view(slab.dtype)
        prefix = np.zeros((theta + 1, LANES), np.float64)
        middle = np.empty(LANES, np.float64)
        best = np.empty(LANES, np.float64)
        best_sum = np.empty(LANES, np.float64)
        for ch in range(task * num_chunks // num_tasks, (task + 1) * num_chunks // num_tasks):
            start = ch * ORDER_CHUNK
            count = min(d, start + ORDER_CHUNK) - start
            if load_keys(bits, rows, start, count, buffer, key):
                finite[task] = False
            for offset in range(0, count, LANES):
                apply_network(buffer, offset, first, second)
            for j in range(theta):
                keys_to_bits(buffer, j, count, key)
            for offset in range(0, count, LANES):
                window_means(floats, offset, theta, half, beta, prefix, middle, best, best_sum)
                for lane in range(min(LANES, count - offset)):
                    out[start + offset + lane] = best_sum[lane] / beta
    return finite.all()


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
        picked = bulyan_selection(checked_distances(batch, self.name), f)
        beta = picked.size - 2 * f
        first, second = sorting_network(int(picked.size))
        outputs = []
        for slab, layer in zip(batch.slabs, batch.global_layers, strict=True):
            out = output_like(layer)
            key = order_key_constants(slab.dtype)
            bits = as_bits(slab)
            threads = numba.get_num_threads()
            if not mean_closest_to_median(
                slab, bits, key, picked, first, second, beta, out, threads
            ):
                raise_non_finite_input(batch, self.name)
            outputs.append(out)
        return outputs
