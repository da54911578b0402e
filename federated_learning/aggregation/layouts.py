"""Models of mixed dtypes as the rules see them.

The rules work on float32/float64 slabs. A model's float16 and bfloat16 layers are aggregated in
float32 (each rule accumulates in float64 where sums are long) and rounded back to their own dtype
once, at the end; float32 and float64 layers are aggregated as they are. Integer layers
(counters such as PyTorch BatchNorm's ``num_batches_tracked``) are never averaged: they are
*carried* as the elementwise maximum of the accepted updates' values, or, where updates must not
reveal more than their clipped float part (differential privacy, secure aggregation, compressed
deltas), they keep the global model's values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from federated_learning.protocol.tensors import is_float

HALF_DTYPES = frozenset({"float16", "bfloat16"})


def trained_names(model: Mapping[str, NDArray[np.generic]]) -> list[str]:
    """The layers a rule aggregates (float dtypes), in model order."""
    return [name for name, layer in model.items() if is_float(layer.dtype.name)]


def carried_names(model: Mapping[str, NDArray[np.generic]]) -> list[str]:
    """The integer layers, carried rather than aggregated, in model order."""
    return [name for name, layer in model.items() if not is_float(layer.dtype.name)]


def compute_dtype(dtype: np.dtype[np.generic]) -> np.dtype[np.generic]:
    """The dtype a layer is aggregated in: float32 for half precision, else its own."""
    return np.dtype(np.float32) if dtype.name in HALF_DTYPES else dtype


def for_rules(layer: NDArray[np.generic]) -> NDArray[np.floating]:
    """A float layer in the dtype the rules compute in (no copy for float32/float64)."""
    return np.asarray(layer, dtype=compute_dtype(layer.dtype))


def restore_dtype(result: NDArray[np.floating], like: NDArray[np.generic]) -> NDArray[np.generic]:
    """A rule's output for ``like``'s layer: its shape, rounded to its dtype (nearest, ties to even)."""
    return np.asarray(result).reshape(like.shape).astype(like.dtype, copy=False)


def carried_maximum(values: Sequence[NDArray[np.generic]], like: NDArray[np.generic]) -> NDArray[np.generic]:
    """The carried value of an integer layer: the elementwise maximum of the updates' values
    (``like``'s value when there are none)."""
    if not values:
        return np.array(like, copy=True)
    result = np.array(values[0], copy=True)
    for value in values[1:]:
        np.maximum(result, value, out=result)
    return result
