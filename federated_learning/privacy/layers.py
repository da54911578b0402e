"""Model updates as lists of layers, and their view as one flat vector.

Clipping, compression and secure aggregation treat an update (one array per layer)
as a single vector of all its coordinates, in layer order and C order inside a layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.floating]
Layers = Sequence[FloatArray]


def flatten(layers: Layers, dtype: type[np.floating] = np.float32) -> NDArray[np.floating]:
    """Concatenate all layers into one 1-D array of `dtype` (C order inside each layer)."""
    if len(layers) == 0:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(layer, dtype=dtype).ravel() for layer in layers])


def unflatten(
    vector: NDArray[np.floating], shapes: Sequence[tuple[int, ...]]
) -> list[NDArray[np.floating]]:
    """Split a flat vector back into arrays of `shapes`; inverse of `flatten`."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    if sum(sizes) != vector.size:
        raise ValueError(
            f"vector has {vector.size} values; shapes {list(shapes)} need {sum(sizes)}"
        )
    out: list[NDArray[np.floating]] = []
    offset = 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(vector[offset : offset + size].reshape(shape))
        offset += size
    return out


def shapes_of(layers: Layers) -> list[tuple[int, ...]]:
    """Shapes of the layers, in order."""
    return [tuple(int(n) for n in np.shape(layer)) for layer in layers]
