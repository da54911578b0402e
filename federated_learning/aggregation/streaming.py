"""The example-weighted sum of updates, folded a group of updates at a time.

The rules that need only the weighted mean of the updates (``SECURE_ALGORITHMS``: the FedAvg
family and the server optimizers) can take it as one row of weight ``sum n_k`` instead of K rows,
as a secure round gives it to them. Folding the updates into a float64 accumulator a few at a
time means K expanded (decompressed, rebased, clipped) updates never exist at once: at 69
quantized updates of 1M values that is 4 MB per update in flight instead of 276 MB.

The fold reads each row once, in place, with the weighted-sum kernel of the averaging rules; a
coordinate's sum is taken in a fixed order (the groups in order, within a group the kernel's
order), so the same updates in the same groups give the same bits for any thread count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
from numpy.typing import NDArray

from .base import flat_client_array, is_all_finite, slab_dtype
from .fedavg import OUTPUT_NOT_FINITE, weighted_sum_affine


class WeightedSum:
    """Per layer, ``sum_k n_k * row_k`` in float64 over the updates added so far."""

    def __init__(self, global_layers: Sequence[NDArray[np.generic]]) -> None:
        self.dtypes = [slab_dtype(layer) for layer in global_layers]
        self.sizes = [int(layer.size) for layer in global_layers]
        self.sums = [np.zeros(size, np.float64) for size in self.sizes]
        self.weight = 0.0
        self.count = 0

    def add(self, rows: Sequence[Sequence[NDArray[np.generic]]], weights: Sequence[float]) -> None:
        """Fold a group of updates in: ``rows[k][i]`` is update k's row for layer i (any shape of
        the layer's size, in the layer's rule dtype), ``weights[k]`` its example count.
        Raises ValueError on a row of the wrong size or dtype, or a sum that is not finite."""
        if len(rows) != len(weights):
            raise ValueError(f"{len(rows)} updates with {len(weights)} weights")
        if not rows:
            return
        threads = numba.get_num_threads()
        for i, (total, size, dtype) in enumerate(zip(self.sums, self.sizes, self.dtypes, strict=True)):
            # Flat, aligned and C-contiguous, as the kernel reads them (a view where they are).
            flat = [flat_client_array(update[i], np.dtype(dtype)) for update in rows]
            if any(row.size != size for row in flat):
                raise ValueError(f"layer {i}: rows of sizes {[row.size for row in flat][:8]}; expected {size}")
            # The kernel reads the rows through their addresses; ``flat`` keeps them alive.
            addresses = np.fromiter((row.ctypes.data for row in flat), dtype=np.int64, count=len(flat))
            # The sum so far is both the kernel's base and its output: each coordinate is read,
            # then written, by one thread.
            flags = weighted_sum_affine(addresses, flat[0], np.asarray(weights, np.float64), total, 1.0, 1.0,
                                        total, threads)
            if flags & OUTPUT_NOT_FINITE:
                bad = [k for k, row in enumerate(flat) if not is_all_finite(row)]
                raise ValueError(f"layer {i}: the weighted sum of the updates is not finite"
                                 + (f" (update {bad[0]} of the group holds NaN or Inf)" if bad else ""))
        self.weight += float(sum(weights))
        self.count += len(rows)

    def mean(self) -> list[NDArray[np.floating]]:
        """Per layer, the weighted mean (sum / total weight), flat, in the layer's rule dtype."""
        if self.weight <= 0:
            raise ValueError("no update with a positive weight was added")
        return [(total / self.weight).astype(dtype) for total, dtype in zip(self.sums, self.dtypes, strict=True)]
