"""Greedy k-center coresets of patch-feature memory banks.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", 2021, arXiv:2106.08265
(PatchCore): a memory bank is subsampled by greedy k-center after a Gaussian random
projection of the features to ``projection_dim`` dimensions. Greedy k-center is Gonzalez,
"Clustering to minimize the maximum intercluster distance", 1985: start from one row, then
repeatedly pick the row farthest from everything picked so far. Its covering radius is at
most twice the optimum's (a 2-approximation).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from .kcenter import CHUNK_ROWS, greedy_k_center_pruned
from .scoring import check_rows, nearest_distances

DEFAULT_PROJECTION_DIM = 128
PROJECTION_BLOCK_ROWS = 16384
"""Rows projected per matmul: bounds the temporary of a float64 input to one block."""


def check_count(name: str, value: int, minimum: int) -> int:
    """An int >= ``minimum`` (not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")  # noqa: TRY004
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return int(value)


def projection_matrix(width: int, dim: int, rng: np.random.Generator) -> NDArray[np.float32]:
    """Gaussian random projection (width, dim), entries N(0, 1/dim): E||xP||^2 = ||x||^2."""
    scaled: NDArray[np.float64] = rng.standard_normal((width, dim)) / np.sqrt(dim)
    return scaled.astype(np.float32)


def project_into(
    rows: NDArray[np.floating], projection: NDArray[np.float32] | None, out: NDArray[np.float32]
) -> None:
    """out = rows @ projection in float32 blocks (a copy of rows when projection is None)."""
    for start in range(0, rows.shape[0], PROJECTION_BLOCK_ROWS):
        block = np.asarray(rows[start : start + PROJECTION_BLOCK_ROWS], dtype=np.float32)
        target = out[start : start + block.shape[0]]
        if projection is None:
            target[...] = block
        else:
            np.matmul(block, projection, out=target)


def check_quotas(
    n: int, owners: NDArray[np.integer] | None, quotas: NDArray[np.integer] | None
) -> tuple[NDArray[np.int64], NDArray[np.int64]] | None:
    """owners (n,) ints in [0, len(quotas)) and quotas >= 0, given together or not at all."""
    if owners is None and quotas is None:
        return None
    if owners is None or quotas is None:
        raise ValueError("owners and quotas go together: give both or neither")
    owner = np.asarray(owners)
    quota = np.asarray(quotas)
    if owner.shape != (n,) or not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"owners must be {n} ints, one per row; got {owner.dtype} {owner.shape}")
    if quota.ndim != 1 or quota.size == 0 or not np.issubdtype(quota.dtype, np.integer):
        raise ValueError(f"quotas must be a non-empty 1-D int array; got {quota.dtype} {quota.shape}")
    if (quota < 0).any():
        raise ValueError(f"quotas must be >= 0; got {quota.min()}")
    if owner.min() < 0 or owner.max() >= quota.size:
        raise ValueError(f"owners must lie in [0, {quota.size}) (one quota each); "
                         f"got [{owner.min()}, {owner.max()}]")
    return owner.astype(np.int64), quota.astype(np.int64)


def greedy_k_center(
    points: NDArray[np.floating],
    k: int,
    *,
    seed: int = 0,
    projection_dim: int = DEFAULT_PROJECTION_DIM,
    owners: NDArray[np.integer] | None = None,
    quotas: NDArray[np.integer] | None = None,
) -> NDArray[np.int64]:
    """Row indices of ``points`` (N, D) picked by greedy k-center, in pick order.

    The first row is drawn uniformly (from ``seed``) among the eligible rows; every next
    one is the eligible row farthest (Euclidean) from all rows picked so far. Distances are
    measured after a Gaussian random projection to ``projection_dim`` dimensions when D is
    larger (float32). With ``owners`` (N,) and ``quotas`` (one per owner) a row is eligible
    while its owner has quota left. Returns min(k, eligible capacity) indices, int64.
    """
    check_rows("points", points)
    k = check_count("k", k, 1)
    projection_dim = check_count("projection_dim", projection_dim, 1)
    n, width = points.shape
    checked = check_quotas(n, owners, quotas)
    owner, quota = checked if checked is not None else (np.zeros(n, np.int64), np.array([k]))
    rng = np.random.default_rng(seed)
    projection = projection_matrix(width, projection_dim, rng) if width > projection_dim else None
    buffer = position_buffer(n, min(width, projection_dim))
    project_into(points, projection, buffer[:n])
    return greedy_projected(buffer, n, k, owner, quota, rng)


def position_buffer(n: int, width: int) -> NDArray[np.float32]:
    """Room for n projected rows and the rows greedy_projected moves: (2n + CHUNK_ROWS, width).

    Pages past the first n rows are only touched as the search moves rows there."""
    return np.empty((2 * n + CHUNK_ROWS, width), dtype=np.float32)


def greedy_projected(
    buffer: NDArray[np.float32],
    n: int,
    k: int,
    owners: NDArray[np.int64],
    quotas: NDArray[np.int64],
    rng: np.random.Generator,
) -> NDArray[np.int64]:
    """greedy_k_center on the rows buffer[:n], already projected (``position_buffer``, which
    it overwrites); the first row is drawn from ``rng`` among the eligible rows."""
    remaining = quotas.copy()
    eligible = np.flatnonzero(remaining[owners] > 0)
    if eligible.size == 0:
        return np.empty(0, dtype=np.int64)
    first = int(eligible[rng.integers(eligible.size)])
    picks = np.empty(k, dtype=np.int64)
    count = greedy_k_center_pruned(buffer, n, first, k, owners, remaining, picks)
    return picks[:count]


def coreset_size(n: int, fraction: float, max_rows: int) -> int:
    """k = min(max_rows, max(1, ceil(fraction * n)))."""
    return min(max_rows, max(1, math.ceil(fraction * n)))


def local_coreset(
    features: NDArray[np.floating], fraction: float, max_rows: int, *, seed: int = 0
) -> NDArray[np.float32]:
    """An agent's coreset: k = min(max_rows, max(1, ceil(fraction * N))) rows of ``features``
    (N, D) picked by greedy k-center, in pick order, float32 (k, D); all N rows when k >= N."""
    check_rows("features", features)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not (
        0.0 < float(fraction) <= 1.0
    ):
        raise ValueError(f"coreset fraction must be in (0, 1]; got {fraction!r}")
    max_rows = check_count("max_rows", max_rows, 1)
    k = coreset_size(features.shape[0], float(fraction), max_rows)
    if k >= features.shape[0]:
        return np.array(features, dtype=np.float32)
    return np.asarray(features[greedy_k_center(features, k, seed=seed)], dtype=np.float32)


def coverage_radius(points: NDArray[np.floating], bank: NDArray[np.floating]) -> float:
    """max_n min_m ||points[n] - bank[m]||: how far the worst-covered point is from the bank."""
    return float(nearest_distances(bank, points).max())
