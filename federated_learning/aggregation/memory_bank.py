"""Federated memory-bank aggregation for PatchCore-style anomaly detectors.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", 2021,
arXiv:2106.08265 (greedy k-center coreset subsampling of the patch-feature memory bank).

Each client sends its memory bank (n_i, D). The union keeps at most ``target_size`` rows,
shared among clients in proportion to their example counts (largest-remainder rounding,
capped at a bank's size, the surplus passed on to the others). Within those quotas rows
are picked uniformly at random ("random") or by greedy k-center over the union
("coreset"): start from a random row, then repeatedly take the eligible row farthest from
everything picked so far. As in PatchCore, the distances for the coreset are measured in
a Gaussian random projection to ``projection_dim`` dimensions when D is larger.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from .base import check_num_examples, is_all_finite

METHODS = ("coreset", "random")
DEFAULT_PROJECTION_DIM = 128


@njit(parallel=True, cache=True, nogil=True)
def update_min_sq_distances(points, center, min_sq):  # type: ignore[no-untyped-def]
    """min_sq[n] = min(min_sq[n], ||points[n] - center||^2); points (N, D), center (D,)."""
    for n in prange(points.shape[0]):
        total = 0.0
        for j in range(points.shape[1]):
            t = np.float64(points[n, j]) - center[j]
            total += t * t
        min_sq[n] = min(min_sq[n], total)


@njit(cache=True, nogil=True)
def farthest_eligible(min_sq, owner, remaining):  # type: ignore[no-untyped-def]
    """Index of the largest min_sq among rows whose owner still has quota; -1 if none."""
    best = -1
    best_value = -1.0
    for n in range(min_sq.size):
        if remaining[owner[n]] > 0 and min_sq[n] > best_value:
            best = n
            best_value = min_sq[n]
    return best


def client_quotas(
    sizes: NDArray[np.int64], weights: NDArray[np.int64], target: int
) -> NDArray[np.int64]:
    """Rows per client: proportional to weights, largest remainder, capped at each bank's size."""
    quotas = np.zeros(sizes.size, dtype=np.int64)
    open_clients = np.ones(sizes.size, dtype=bool)
    left = target
    while left > 0 and open_clients.any():
        share = np.where(open_clients, weights, 0).astype(np.float64)
        raw = left * share / share.sum()
        extra = np.floor(raw).astype(np.int64)
        shortfall = left - int(extra.sum())
        order = np.argsort(-(raw - extra), kind="stable")
        extra[order[:shortfall]] += 1
        capped = np.minimum(quotas + extra, sizes)
        left -= int((capped - quotas).sum())
        quotas = capped
        open_clients = quotas < sizes
    return quotas


def random_pick(
    offsets: NDArray[np.int64], quotas: NDArray[np.int64], rng: np.random.Generator
) -> NDArray[np.int64]:
    """Uniform rows without replacement within each bank; union-row indices, sorted."""
    picks = [
        offsets[i] + rng.choice(offsets[i + 1] - offsets[i], size=int(q), replace=False)
        for i, q in enumerate(quotas)
    ]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def coreset_pick(
    points: NDArray[np.floating],
    owner: NDArray[np.int64],
    quotas: NDArray[np.int64],
    rng: np.random.Generator,
) -> NDArray[np.int64]:
    """Greedy k-center over the union, a row eligible while its bank has quota left."""
    remaining = quotas.copy()
    min_sq = np.full(points.shape[0], np.inf)
    eligible = np.flatnonzero(remaining[owner] > 0)
    current = int(eligible[rng.integers(eligible.size)])
    picked = []
    for _ in range(int(quotas.sum())):
        picked.append(current)
        remaining[owner[current]] -= 1
        min_sq[current] = -1.0
        update_min_sq_distances(points, points[current].astype(np.float64), min_sq)
        current = int(farthest_eligible(min_sq, owner, remaining))
    return np.asarray(picked, dtype=np.int64)


def check_banks(banks: Sequence[NDArray[np.floating]]) -> int:
    """Non-empty 2-D finite float banks of one feature width; return the width."""
    if len(banks) == 0:
        raise ValueError("no memory banks to aggregate")
    width = -1
    for i, bank in enumerate(banks):
        if not isinstance(bank, np.ndarray) or bank.ndim != 2:
            raise ValueError(f"memory bank {i} must be a 2-D numpy array (rows x features)")
        if not np.issubdtype(bank.dtype, np.floating):
            raise ValueError(f"memory bank {i} has dtype {bank.dtype}; must be floating point")
        if bank.shape[0] == 0 or bank.shape[1] == 0:
            raise ValueError(f"memory bank {i} is empty: shape {bank.shape}")
        if width == -1:
            width = bank.shape[1]
        elif bank.shape[1] != width:
            raise ValueError(f"memory bank {i} has {bank.shape[1]} features; bank 0 has {width}")
        if not is_all_finite(np.ascontiguousarray(bank)):
            raise ValueError(f"memory bank {i} contains NaN or Inf")
    return width


def aggregate_memory_banks(
    banks: list[NDArray[np.floating]],
    num_examples: list[int],
    target_size: int,
    *,
    method: str = "coreset",
    seed: int = 0,
    projection_dim: int = DEFAULT_PROJECTION_DIM,
) -> NDArray[np.floating]:
    """Merge client memory banks into one of at most ``target_size`` rows.

    Returns the chosen rows of the union (float64 if any bank is float64, else float32),
    ordered by bank then row for "random", in pick order for "coreset". When the union
    has at most ``target_size`` rows it is returned whole.
    """
    width = check_banks(banks)
    counts = check_num_examples(num_examples, len(banks))
    if (
        isinstance(target_size, bool)
        or not isinstance(target_size, (int, np.integer))
        or target_size < 1
    ):
        raise ValueError(f"memory bank target_size must be an int >= 1; got {target_size!r}")
    if method not in METHODS:
        raise ValueError(f"memory bank method must be one of {METHODS}; got {method!r}")
    if (
        isinstance(projection_dim, bool)
        or not isinstance(projection_dim, int)
        or projection_dim < 1
    ):
        raise ValueError(f"memory bank projection_dim must be an int >= 1; got {projection_dim!r}")
    dtype = np.float64 if any(bank.dtype == np.float64 for bank in banks) else np.float32
    union = np.concatenate([bank.astype(dtype, copy=False) for bank in banks], axis=0)
    if union.shape[0] <= target_size:
        return union
    sizes = np.asarray([bank.shape[0] for bank in banks], dtype=np.int64)
    quotas = client_quotas(sizes, counts, int(target_size))
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if method == "random":
        return union[random_pick(offsets, quotas, rng)]
    owner = np.repeat(np.arange(len(banks), dtype=np.int64), sizes)
    points = union
    if width > projection_dim:
        projection = rng.standard_normal((width, projection_dim)) / np.sqrt(projection_dim)
        points = np.ascontiguousarray(union @ projection.astype(dtype))
    return union[coreset_pick(points, owner, quotas, rng)]
