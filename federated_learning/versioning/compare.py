"""How far apart two model versions are, layer by layer and as a whole.

For layers a and b (same name and shape), with every sum accumulated in float64:

    distance           ||a - b||_2
    relative distance  ||a - b||_2 / max(||a||_2, ||b||_2)      in [0, 2]; 0 when both are zero
    cosine similarity  <a, b> / (||a||_2 ||b||_2)                in [-1, 1]

Cosine is undefined for a zero vector; we define it as 1.0 when both are zero (the layers
are identical) and 0.0 when exactly one is (no shared direction). The relative distance is
taken against the larger norm so that it is symmetric and bounded. "Overall" figures treat
all layers as one flattened vector. Metric deltas are ``b - a`` for keys both versions have.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

CHUNK_ELEMENTS = 1 << 16
"""Elements converted to float64 at a time, so a large layer is never copied whole."""


@dataclass(frozen=True)
class Moments:
    """Sums over paired vectors a, b: <a,a>, <b,b>, <a,b> and ||a-b||^2, in float64."""

    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    dd: float = 0.0

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.aa + other.aa, self.bb + other.bb, self.ab + other.ab, self.dd + other.dd)


def cosine_from_moments(aa: float, bb: float, ab: float) -> float:
    """<a,b> / sqrt(<a,a><b,b>), clipped to [-1, 1]; 1.0 if both are zero, 0.0 if one is."""
    if aa == 0.0 and bb == 0.0:
        return 1.0
    if aa == 0.0 or bb == 0.0:
        return 0.0
    return max(-1.0, min(1.0, ab / math.sqrt(aa * bb)))


def relative_distance(moments: Moments) -> float:
    """||a-b|| / max(||a||, ||b||); 0.0 when both are zero."""
    scale = math.sqrt(max(moments.aa, moments.bb))
    return 0.0 if scale == 0.0 else math.sqrt(moments.dd) / scale


def layer_moments(a: NDArray[np.floating], b: NDArray[np.floating]) -> Moments:
    """:class:`Moments` of two same-shape arrays, in chunks of ``CHUNK_ELEMENTS``."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    aa = bb = ab = dd = 0.0
    for start in range(0, flat_a.size, CHUNK_ELEMENTS):
        x = flat_a[start:start + CHUNK_ELEMENTS].astype(np.float64)
        y = flat_b[start:start + CHUNK_ELEMENTS].astype(np.float64)
        diff = x - y
        aa += float(x @ x)
        bb += float(y @ y)
        ab += float(x @ y)
        dd += float(diff @ diff)
    return Moments(aa, bb, ab, dd)


@dataclass(frozen=True)
class LayerDifference:
    name: str
    shape: tuple[int, ...]
    l2_distance: float
    relative_distance: float
    cosine_similarity: float
    norm_a: float
    norm_b: float


@dataclass(frozen=True)
class VersionComparison:
    layers: list[LayerDifference]
    l2_distance: float
    relative_distance: float
    cosine_similarity: float
    metric_deltas: dict[str, float] = field(default_factory=dict)
    """``b - a`` for each metric both versions report."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (shapes as lists)."""
        out = asdict(self)
        for layer in out["layers"]:
            layer["shape"] = list(layer["shape"])
        return out


def _difference(name: str, a: NDArray[np.floating], moments: Moments) -> LayerDifference:
    return LayerDifference(
        name=name, shape=tuple(a.shape), l2_distance=math.sqrt(moments.dd),
        relative_distance=relative_distance(moments),
        cosine_similarity=cosine_from_moments(moments.aa, moments.bb, moments.ab),
        norm_a=math.sqrt(moments.aa), norm_b=math.sqrt(moments.bb),
    )


def check_same_layout(a: Mapping[str, NDArray[np.floating]],
                      b: Mapping[str, NDArray[np.floating]]) -> None:
    """Raise ValueError naming the first layer whose name or shape differs."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError(f"versions have different layers: only in a {only_a}, only in b {only_b}")
    for name, layer in a.items():
        if layer.shape != b[name].shape:
            raise ValueError(f"layer '{name}' has shape {layer.shape} in a and {b[name].shape} in b")


def metric_deltas(metrics_a: Mapping[str, float] | None,
                  metrics_b: Mapping[str, float] | None) -> dict[str, float]:
    """``metrics_b[k] - metrics_a[k]`` for every key in both, sorted by key."""
    if metrics_a is None or metrics_b is None:
        return {}
    shared = sorted(set(metrics_a) & set(metrics_b))
    return {key: float(metrics_b[key]) - float(metrics_a[key]) for key in shared}


def compare_versions(a: Mapping[str, NDArray[np.floating]], b: Mapping[str, NDArray[np.floating]],
                     metrics_a: Mapping[str, float] | None = None,
                     metrics_b: Mapping[str, float] | None = None) -> VersionComparison:
    """Per-layer and overall distance and cosine between versions a and b, layers in a's order."""
    check_same_layout(a, b)
    layers: list[LayerDifference] = []
    total = Moments()
    for name, layer_a in a.items():
        moments = layer_moments(layer_a, b[name])
        if not all(math.isfinite(v) for v in (moments.aa, moments.bb, moments.ab, moments.dd)):
            raise ValueError(f"layer '{name}' holds NaN or Inf values")
        layers.append(_difference(name, layer_a, moments))
        total = total + moments
    return VersionComparison(
        layers=layers, l2_distance=math.sqrt(total.dd), relative_distance=relative_distance(total),
        cosine_similarity=cosine_from_moments(total.aa, total.bb, total.ab),
        metric_deltas=metric_deltas(metrics_a, metrics_b),
    )
