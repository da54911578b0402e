"""Server-side optimiser state as flat name -> array maps (safetensors-friendly).

Layer ``i`` of a per-layer state vector ``m`` is stored under ``"m.i"`` as a flat
float32/float64 array; scalars (round counters) are stored as 1-element int64 arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class UnpackedState:
    """Per-layer vectors by prefix, and scalar counters by name."""

    layers: dict[str, list[NDArray[np.floating]]]
    counters: dict[str, int]


def pack_state(
    layers: Mapping[str, list[NDArray[np.floating]]], counters: Mapping[str, int]
) -> dict[str, NDArray[np.generic]]:
    """Flatten per-layer vectors and counters into one name -> array dict (copies)."""
    state: dict[str, NDArray[np.generic]] = {}
    for prefix, vectors in layers.items():
        for i, vector in enumerate(vectors):
            state[f"{prefix}.{i}"] = vector.copy()
    for name, value in counters.items():
        state[name] = np.asarray([value], dtype=np.int64)
    return state


def unpack_state(
    state: Mapping[str, NDArray[np.generic]],
    prefixes: tuple[str, ...],
    counter_names: tuple[str, ...],
    rule: str,
) -> UnpackedState:
    """Inverse of ``pack_state``; copies the arrays and rejects unknown or malformed keys."""
    layers: dict[str, list[NDArray[np.floating]]] = {prefix: [] for prefix in prefixes}
    known: set[str] = set()
    for prefix in prefixes:
        while f"{prefix}.{len(layers[prefix])}" in state:
            key = f"{prefix}.{len(layers[prefix])}"
            array = np.asarray(state[key])
            if array.ndim != 1 or array.dtype not in (np.float32, np.float64):
                raise ValueError(
                    f"{rule} state {key!r} must be a flat float32/float64 array; "
                    f"got {array.dtype}{array.shape}"
                )
            layers[prefix].append(np.array(array, copy=True))
            known.add(key)
    counters: dict[str, int] = {}
    for name in counter_names:
        if name in state:
            array = np.asarray(state[name])
            if array.shape != (1,) or not np.issubdtype(array.dtype, np.integer) or array[0] < 0:
                raise ValueError(
                    f"{rule} state {name!r} must be one non-negative int; got {array!r}"
                )
            counters[name] = int(array[0])
            known.add(name)
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"{rule} state has unknown keys {unknown}")
    return UnpackedState(layers=layers, counters=counters)


def check_state_shapes(
    state: list[NDArray[np.floating]], layers: list[NDArray[np.floating]], rule: str
) -> None:
    """Server state must match the model it is applied to, layer by layer."""
    if len(state) != len(layers):
        raise ValueError(f"{rule} state has {len(state)} layers; the model has {len(layers)}")
    for i, (kept, layer) in enumerate(zip(state, layers, strict=True)):
        if kept.shape != layer.shape or kept.dtype != layer.dtype:
            raise ValueError(
                f"{rule} state layer {i} is {kept.dtype}{kept.shape}; "
                f"the model layer is {layer.dtype}{layer.shape}"
            )
