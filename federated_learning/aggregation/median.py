"""Coordinate-wise median (Flower's FedMedian).

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", 2018, arXiv:1803.01498.

For each coordinate the median of the K values, unweighted; for even K the mean of the
two middle values, as ``np.median``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from .base import Slab, Strategy, UpdateBatch, outputs_like, raise_non_finite_input
from .order_statistics import coordinate_mean_of_ranks


def median_ranks(num_values: int) -> tuple[int, int]:
    """Ranks [lo, hi) whose mean is the median: the middle one, or the middle two."""
    half = num_values // 2
    return (half, half + 1) if num_values % 2 else (half - 1, half + 1)


def median(slabs: list[Slab], outputs: list[NDArray[np.floating]]) -> bool:
    """Fill ``outputs[i]`` with the coordinate-wise median of ``slabs[i]``; False on NaN/Inf."""
    rows = np.arange(slabs[0].shape[0], dtype=np.int64)
    lo, hi = median_ranks(rows.size)
    finite = True
    for slab, out in zip(slabs, outputs, strict=True):
        finite &= coordinate_mean_of_ranks(slab, rows, lo, hi, out)
    return finite


class Median(Strategy):
    """Coordinate-wise median of the clients' models."""

    name: ClassVar[str] = "median"
    requires_individual_updates: ClassVar[bool] = True

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        outputs = outputs_like(batch.global_layers)
        if not median(batch.slabs, outputs):
            raise_non_finite_input(batch, self.name)
        return outputs
