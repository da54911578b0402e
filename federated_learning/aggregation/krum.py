"""Krum and Multi-Krum: Byzantine-robust selection by summed distances to nearest neighbours.

Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017 (no arXiv id; proceedings paper 6617).
Multi-Krum: El Mhamdi, Guerraoui and Rouault, "The Hidden Vulnerability of Distributed
Learning in Byzantium", 2018, arXiv:1802.07927.

score(i) = sum of the n - f - 2 smallest ||x_i - x_j||^2 over j != i (at least one term,
as in Flower). Krum returns the update with the lowest score; Multi-Krum the
example-weighted mean of the m lowest-scoring updates (Flower's ``aggregate``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from .base import (
    Slab,
    Strategy,
    UpdateBatch,
    check_int,
    output_buffer,
    outputs_like,
    raise_non_finite_input,
)
from .fedavg import weighted_combination

DISTANCE_CHUNKS = 48
DISTANCE_BLOCK = 512
# Vectorised sums of squares inside a block may be reassociated; results still depend only
# on the block layout (fixed by d), never on the thread count. No nnan/ninf: NaN must propagate.
DISTANCE_FASTMATH = {"reassoc", "contract"}


@njit(cache=True, nogil=True, fastmath=DISTANCE_FASTMATH)
def add_block_distances(slab, start, stop, partial):  # type: ignore[no-untyped-def]
    """partial[i, j] += sum_{start <= c < stop} (slab[i, c] - slab[j, c])^2 for i < j.

    Rows are taken two at a time against four at a time, so each loaded value feeds
    several pairs; the K rows of [start, stop) stay in L2 while every pair is formed.
    """
    k_rows = slab.shape[0]
    n = stop - start
    for i in range(0, k_rows, 2):
        if i + 1 == k_rows:
            break
        xa = slab[i, start:stop]
        xb = slab[i + 1, start:stop]
        acc = np.float32(0.0)
        for c in range(n):
            t = xa[c] - xb[c]
            acc += t * t
        partial[i, i + 1] += acc
        j = i + 2
        while j + 4 <= k_rows:
            x0 = slab[j, start:stop]
            x1 = slab[j + 1, start:stop]
            x2 = slab[j + 2, start:stop]
            x3 = slab[j + 3, start:stop]
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            for c in range(n):
                u = xa[c]
                v = xb[c]
                y0 = x0[c]
                y1 = x1[c]
                y2 = x2[c]
                y3 = x3[c]
                a0 += (u - y0) * (u - y0)
                a1 += (u - y1) * (u - y1)
                a2 += (u - y2) * (u - y2)
                a3 += (u - y3) * (u - y3)
                b0 += (v - y0) * (v - y0)
                b1 += (v - y1) * (v - y1)
                b2 += (v - y2) * (v - y2)
                b3 += (v - y3) * (v - y3)
            partial[i, j] += a0
            partial[i, j + 1] += a1
            partial[i, j + 2] += a2
            partial[i, j + 3] += a3
            partial[i + 1, j] += b0
            partial[i + 1, j + 1] += b1
            partial[i + 1, j + 2] += b2
            partial[i + 1, j + 3] += b3
            j += 4
        while j < k_rows:
            y = slab[j, start:stop]
            a0 = b0 = np.float32(0.0)
            for c in range(n):
                a0 += (xa[c] - y[c]) * (xa[c] - y[c])
                b0 += (xb[c] - y[c]) * (xb[c] - y[c])
            partial[i, j] += a0
            partial[i + 1, j] += b0
            j += 1


@njit(parallel=True, cache=True, nogil=True)
def add_pairwise_sq_distances(slab, partials):  # type: ignore[no-untyped-def]
    """partials[ch, i, j] += squared distance of rows i < j over coordinate chunk ch.

    slab: (K, d) float32/float64; partials: (C, K, K) float64, C <= DISTANCE_CHUNKS. The
    chunk layout depends on d and C only; each chunk is one thread's, so sums are
    thread-count free.
    """
    d = slab.shape[1]
    num_chunks = partials.shape[0]
    chunk = (d + num_chunks - 1) // num_chunks
    for ch in prange(num_chunks):
        stop = min(d, (ch + 1) * chunk)
        for start in range(ch * chunk, stop, DISTANCE_BLOCK):
            add_block_distances(slab, start, min(stop, start + DISTANCE_BLOCK), partials[ch])


def partial_sums_buffer(
    num_clients: int, scratch: NDArray[np.floating] | None
) -> NDArray[np.float64]:
    """Zeroed (C, K, K) float64 per-chunk sums, in ``scratch``'s memory when it holds them.

    C = DISTANCE_CHUNKS, or as many K x K blocks as scratch holds (at least one), so the
    sums need no memory beyond the caller's output and one K x K block. C depends on the
    scratch size only, never on the thread count.
    """
    block = num_clients * num_clients
    if scratch is None:
        return np.zeros((DISTANCE_CHUNKS, num_clients, num_clients), dtype=np.float64)
    flat = scratch.reshape(-1)
    num_chunks = min(DISTANCE_CHUNKS, flat.nbytes // (8 * block))
    if num_chunks == 0 or flat.ctypes.data % 8 or not flat.flags.c_contiguous:
        return np.zeros((1, num_clients, num_clients), dtype=np.float64)
    words = flat[: num_chunks * block * 8 // flat.itemsize].view(np.float64)
    words[:] = 0.0
    return words.reshape(num_chunks, num_clients, num_clients)


def pairwise_sq_distances(
    slabs: list[Slab], scratch: NDArray[np.floating] | None = None
) -> NDArray[np.float64]:
    """Symmetric (K, K) float64 matrix of squared Euclidean distances over all layers.

    scratch: optional memory (e.g. the output the caller fills next) for the per-chunk
    partial sums; its contents are overwritten.
    """
    num_clients = slabs[0].shape[0]
    partials = partial_sums_buffer(num_clients, scratch)
    for slab in slabs:
        add_pairwise_sq_distances(slab, partials)
    upper = partials.sum(axis=0)
    return np.asarray(upper + upper.T, dtype=np.float64)


def krum_scores(
    distances: NDArray[np.float64], candidates: NDArray[np.int64], num_malicious: int
) -> NDArray[np.float64]:
    """Score of each candidate: sum of its max(1, n - f - 2) smallest distances to the others."""
    n = candidates.size
    num_closest = max(1, n - num_malicious - 2)
    sub = distances[np.ix_(candidates, candidates)]
    np.fill_diagonal(sub, np.inf)
    nearest = np.sort(sub, axis=1)[:, :num_closest]
    return np.asarray(nearest.sum(axis=1), dtype=np.float64)


def checked_distances(
    batch: UpdateBatch, rule: str, scratch: NDArray[np.floating] | None = None
) -> NDArray[np.float64]:
    """Pairwise distances; any NaN/Inf update makes some distance non-finite."""
    distances = pairwise_sq_distances(batch.slabs, scratch)
    if not np.all(np.isfinite(distances)):
        raise_non_finite_input(batch, rule)
    return distances


def check_krum_size(rule: str, num_clients: int, num_malicious: int) -> None:
    """Krum's guarantee needs n >= 2f + 3 (so f < n / 2)."""
    if num_clients < 2 * num_malicious + 3:
        raise ValueError(
            f"{rule} needs at least 2*f+3 updates; got {num_clients} with f={num_malicious}"
        )


class Krum(Strategy):
    """The update closest to its n - f - 2 nearest neighbours (Flower's Krum)."""

    name: ClassVar[str] = "krum"
    requires_individual_updates: ClassVar[bool] = True

    def __init__(self, *, num_malicious_clients: int = 0, num_clients_to_keep: int = 0) -> None:
        self.num_malicious_clients = check_int(
            self.name, "num_malicious_clients", num_malicious_clients, 0
        )
        self.num_clients_to_keep = check_int(
            self.name, "num_clients_to_keep", num_clients_to_keep, 0
        )

    def params(self) -> dict[str, object]:
        return {
            "num_malicious_clients": self.num_malicious_clients,
            "num_clients_to_keep": self.num_clients_to_keep,
        }

    def to_keep(self, num_clients: int) -> int:
        """How many updates to average; 0 means plain Krum (return the best one)."""
        return self.num_clients_to_keep

    def check_batch(self, batch: UpdateBatch) -> None:
        check_krum_size(self.name, batch.num_clients, self.num_malicious_clients)
        keep = self.to_keep(batch.num_clients)
        if keep > batch.num_clients:
            raise ValueError(
                f"{self.name} num_clients_to_keep must be <= the number of updates "
                f"({batch.num_clients}); got {keep}"
            )

    def select(
        self, batch: UpdateBatch, scratch: NDArray[np.floating] | None = None
    ) -> NDArray[np.int64]:
        """Indices of the chosen updates, best score first (ties: lower index first)."""
        distances = checked_distances(batch, self.name, scratch)
        everyone = np.arange(batch.num_clients, dtype=np.int64)
        scores = krum_scores(distances, everyone, self.num_malicious_clients)
        keep = max(1, self.to_keep(batch.num_clients))
        return np.argsort(scores, kind="stable")[:keep].astype(np.int64)

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        outputs = outputs_like(batch.global_layers)
        chosen = self.select(batch, output_buffer(outputs))
        if self.to_keep(batch.num_clients) == 0:
            best = int(chosen[0])
            for slab, out in zip(batch.slabs, outputs, strict=True):
                np.copyto(out, slab[best], casting="same_kind")
            return outputs
        counts = batch.num_examples[chosen].astype(np.float64)
        weights = counts / counts.sum()
        return weighted_combination(batch, weights, rows=chosen, rule=self.name, outputs=outputs)


class MultiKrum(Krum):
    """Example-weighted mean of the m best Krum scores; m defaults to n - f."""

    name: ClassVar[str] = "multikrum"

    def __init__(
        self, *, num_malicious_clients: int = 0, num_clients_to_keep: int | None = None
    ) -> None:
        super().__init__(num_malicious_clients=num_malicious_clients)
        if num_clients_to_keep is not None:
            self.num_clients_to_keep = check_int(
                self.name, "num_clients_to_keep", num_clients_to_keep, 1
            )
        self.keep_default = num_clients_to_keep is None

    def params(self) -> dict[str, object]:
        keep = None if self.keep_default else self.num_clients_to_keep
        return {"num_malicious_clients": self.num_malicious_clients, "num_clients_to_keep": keep}

    def to_keep(self, num_clients: int) -> int:
        if self.keep_default:
            return num_clients - self.num_malicious_clients
        return self.num_clients_to_keep
