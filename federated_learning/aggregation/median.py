"""Coordinate-wise median (Flower's FedMedian).

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", 2018, arXiv:1803.01498.

For each coordinate the median of the K values, unweighted; for even K the mean of the
two middle values, as ``np.median``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from .base import Slab, Strategy, UpdateBatch, outputs_like, raise_non_finite_input, slab_dtype
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


MEDIAN_BLOCK_BYTES = 1 << 24
"""Bytes of the (K, columns) buffer :func:`median_of_updates` copies each column block into."""


def median_of_updates(updates: Sequence[Sequence[NDArray[np.generic]]],
                      like: Sequence[NDArray[np.generic]]) -> list[NDArray[np.floating]] | None:
    """The coordinate-wise median of K updates (``updates[k][i]``: layer i of update k, any shape
    of ``like[i]``'s size), one flat array per layer in ``like``'s slab dtype; None on NaN/Inf.

    The same values as :func:`median` on the K x d slab, without building it: each block of
    columns is copied into one reused (K, columns) buffer of at most ``MEDIAN_BLOCK_BYTES``.
    """
    count = len(updates)
    outputs = outputs_like(like)
    finite = True
    for i, (layer, out) in enumerate(zip(like, outputs, strict=True)):
        dtype = slab_dtype(layer)
        width = max(1, MEDIAN_BLOCK_BYTES // (count * np.dtype(dtype).itemsize))
        buffer = np.empty((count, min(width, layer.size)), dtype)
        rows = [np.reshape(update[i], -1) for update in updates]
        for start in range(0, layer.size, width):
            stop = min(layer.size, start + width)
            block = buffer if stop - start == buffer.shape[1] else np.empty((count, stop - start), dtype)
            for k, row in enumerate(rows):
                np.copyto(block[k], row[start:stop], casting="same_kind")
            finite &= median([block], [out[start:stop]])
    return outputs if finite else None


class Median(Strategy):
    """Coordinate-wise median of the clients' models."""

    name: ClassVar[str] = "median"
    requires_individual_updates: ClassVar[bool] = True

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        outputs = outputs_like(batch.global_layers)
        if not median(batch.slabs, outputs):
            raise_non_finite_input(batch, self.name)
        return outputs
