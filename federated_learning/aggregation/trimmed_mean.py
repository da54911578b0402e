"""Coordinate-wise trimmed mean (Flower's FedTrimmedAvg).

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", 2018, arXiv:1803.01498.

For each coordinate, drop the int(beta * K) smallest and as many largest of the K values
and average the rest, unweighted (the example counts play no part, as in Flower).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from .base import Slab, Strategy, UpdateBatch, check_real, outputs_like, raise_non_finite_input
from .order_statistics import coordinate_mean_of_ranks


def trim_bounds(num_clients: int, beta: float) -> tuple[int, int]:
    """Ranks kept: [int(beta * K), K - int(beta * K)), Flower's and SciPy's convention."""
    cut = int(beta * num_clients)
    return cut, num_clients - cut


def trimmed_mean(slabs: list[Slab], beta: float, outputs: list[NDArray[np.floating]]) -> bool:
    """Fill ``outputs[i]`` with the trimmed mean of ``slabs[i]``'s columns; False on NaN/Inf."""
    rows = np.arange(slabs[0].shape[0], dtype=np.int64)
    lo, hi = trim_bounds(rows.size, beta)
    finite = True
    for slab, out in zip(slabs, outputs, strict=True):
        finite &= coordinate_mean_of_ranks(slab, rows, lo, hi, out)
    return finite


class TrimmedMean(Strategy):
    """Mean of the values left after cutting a fraction beta at each end, per coordinate."""

    name: ClassVar[str] = "trimmed_mean"
    requires_individual_updates: ClassVar[bool] = True

    def __init__(self, *, beta: float = 0.2) -> None:
        self.beta = check_real(self.name, "beta", beta, 0.0, 0.5, low_open=False, high_open=True)

    def params(self) -> dict[str, object]:
        return {"beta": self.beta}

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        outputs = outputs_like(batch.global_layers)
        if not trimmed_mean(batch.slabs, self.beta, outputs):
            raise_non_finite_input(batch, self.name)
        return outputs
