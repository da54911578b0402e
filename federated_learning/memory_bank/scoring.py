"""Anomaly scores against a memory bank, and the ROC AUC to judge them.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", 2021, arXiv:2106.08265:
a patch's anomaly score is its Euclidean distance to the nearest row of the memory bank.
ROC AUC by the Mann-Whitney U statistic: AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg),
R_pos the sum of the positives' ranks among all scores, tied scores sharing their mean rank
(Hanley and McNeil, "The meaning and use of the area under a ROC curve", 1982).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

QUERY_BLOCK_BYTES = 32 << 20
"""Most bytes of the (queries x bank) float32 block of inner products held at once."""


def check_rows(name: str, values: NDArray[np.floating], width: int | None = None) -> None:
    """A non-empty 2-D finite float array (rows x features), ``width`` features when given."""
    if not isinstance(values, np.ndarray) or values.ndim != 2:
        raise ValueError(f"{name} must be a 2-D numpy array (rows x features)")
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"{name} has dtype {values.dtype}; must be floating point")
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {values.shape}")
    if width is not None and values.shape[1] != width:
        raise ValueError(f"{name} has {values.shape[1]} features; the bank has {width}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or Inf")


def nearest_distances(
    bank: NDArray[np.floating], queries: NDArray[np.floating]
) -> NDArray[np.float32]:
    """min_m ||queries[q] - bank[m]||_2 for every query row: (Q, D), (M, D) -> (Q,) float32.

    Blocks of queries go through one BLAS matmul against the bank,
    ||q - b||^2 = ||q||^2 + ||b||^2 - 2 q.b, which finds each query's nearest row; the
    distance to that row is then computed directly as ||q - b||, because the expanded form
    loses small distances to cancellation in float32. Both sides are first shifted by the
    bank's mean (distances do not change) so that the norms, and the rounding error of the
    expansion, scale with the spread of the features rather than their offset. Memory: the
    bank in float32 plus one block of at most QUERY_BLOCK_BYTES, never the whole Q x M matrix.
    """
    check_rows("memory bank", bank)
    check_rows("queries", queries, bank.shape[1])
    mean = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
    centers = np.asarray(bank, dtype=np.float32) - mean
    center_sq = np.einsum("md,md->m", centers, centers)
    block = max(1, QUERY_BLOCK_BYTES // (4 * centers.shape[0]))
    out = np.empty(queries.shape[0], dtype=np.float32)
    for start in range(0, queries.shape[0], block):
        rows = np.asarray(queries[start : start + block], dtype=np.float32) - mean
        scores = rows @ centers.T
        scores *= -2.0
        scores += center_sq
        nearest = np.argmin(scores, axis=1)
        diff = rows - centers[nearest]
        out[start : start + rows.shape[0]] = np.sqrt(np.einsum("qd,qd->q", diff, diff))
    return out


def average_ranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks of ``values`` (n,), tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    ends = np.append(starts[1:], ordered.size)
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(labels: NDArray[np.generic], scores: NDArray[np.floating]) -> float:
    """Area under the ROC curve of ``scores`` (higher = more anomalous) for 0/1 ``labels``.

    Equals the probability that a random positive scores above a random negative, ties
    counting one half (the Mann-Whitney U statistic over n_pos n_neg).
    """
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.size != s.size:
        raise ValueError(f"labels and scores must be 1-D of one length; got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    positive = y == 1
    n_pos = int(positive.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    rank_sum = float(average_ranks(s)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
