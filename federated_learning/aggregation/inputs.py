"""One uploaded update as the rows a rule reads: decoded, checked, re-based, clipped.

The aggregator runs :func:`prepare_update` on a worker thread for each update blob of a job,
after the blob's SHA-256 was checked against its digest. The work is NumPy and Numba that
releases the GIL, so a job's updates are prepared in parallel while the next blobs arrive.
A dense float32 update costs no copy: its rows are read-only views of the blob's bytes, which
the averaging rules read in place (``Strategy.reads_client_arrays``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from numba import njit
from numpy.typing import NDArray

from federated_learning.numeric import REASSOCIATE
from federated_learning.privacy.mechanisms import NormType, clip_update
from federated_learning.protocol.messages import ASYNC_ALGORITHMS, SECURE_ALGORITHMS
from federated_learning.protocol.tensors import InvalidTensor, is_float, spec_of
from federated_learning.protocol.updates import decode_update, is_compressed
from federated_learning.types import NamedLayers

from .base import slab_dtype
from .layouts import for_rules


class Rows(Enum):
    """What a row holds for a rule: the agent's model, its delta from the base, or FedSGD's
    gradient (base - model: the agent took one local step, which the server takes again at its
    own learning rate)."""

    MODELS = "models"
    DELTAS = "deltas"
    GRADIENTS = "gradients"


def rows_for(algorithm: str) -> Rows:
    """FedBuff folds deltas (each from the version its agent started from); FedSGD steps along
    gradients; every other rule combines models."""
    if algorithm in ASYNC_ALGORITHMS:
        return Rows.DELTAS
    return Rows.GRADIENTS if algorithm == "fedsgd" else Rows.MODELS


def folds_updates(algorithm: str, scored: bool) -> bool:
    """Whether a job takes its updates' example-weighted mean as one row (``WeightedSum``) instead
    of every update: its rule needs only the mean (the rules a secure round may use), and its
    updates are not scored (scores need each update)."""
    return algorithm in SECURE_ALGORITHMS and not scored


def rebased(base: np.ndarray, model: np.ndarray, own: np.ndarray) -> np.ndarray:
    """A layer trained from ``own`` moved onto ``base``: base + (model - own). Counters too, so a
    stale update's step count adds to the current one (a bool layer is taken as it is)."""
    if model.dtype == np.bool_:
        return model
    moved = base + (model.astype(np.float64) - own) if is_float(model.dtype.name) else base + (model - own)
    return np.asarray(moved).astype(model.dtype)


@njit(cache=True, nogil=True, fastmath=REASSOCIATE)
def squared_distance(x, y):  # type: ignore[no-untyped-def]
    """sum_i (x_i - y_i)^2 in float64; x, y: (n,) float32 or float64."""
    total = 0.0
    for i in range(x.size):
        d = np.float64(x[i]) - np.float64(y[i])
        total += d * d
    return total


@njit(cache=True, nogil=True, fastmath=REASSOCIATE)
def squared_norm(x):  # type: ignore[no-untyped-def]
    """sum_i x_i^2 in float64; x: (n,) float32 or float64."""
    total = 0.0
    for i in range(x.size):
        total += np.float64(x[i]) * np.float64(x[i])
    return total


@dataclass(frozen=True)
class UpdateLayout:
    """What each update of a job is read against: the job's base model and how its rule reads rows.

    ``carried`` names the integer layers whose values follow the updates; ``clip_norm`` is central
    DP's bound on each update (None: no clipping).
    """

    base: NamedLayers
    rows: Rows
    max_bytes: int
    carried: tuple[str, ...] = ()
    clip_norm: float | None = None
    clip_norm_type: NormType = "l2"
    measure_norms: bool = True
    """Whether each update's distance from the reference is computed (only its anomaly score uses it)."""
    trained: tuple[str, ...] = field(init=False)
    global_layers: tuple[NDArray[np.floating], ...] = field(init=False)

    def __post_init__(self) -> None:
        trained = tuple(name for name, layer in self.base.items() if is_float(layer.dtype.name))
        object.__setattr__(self, "trained", trained)
        object.__setattr__(self, "global_layers", tuple(for_rules(self.base[name]) for name in trained))

    @property
    def reference(self) -> list[NDArray[np.floating]]:
        """What a row's distance is measured from: the global model (model rows) or zero."""
        if self.rows is Rows.MODELS:
            return list(self.global_layers)
        return [np.zeros_like(layer) for layer in self.global_layers]


@dataclass(frozen=True)
class PreparedUpdate:
    """One update's rows (one per trained layer, in the layer's shape), its integer layers to carry,
    and its distance from the reference (L2, float64; NaN unless ``UpdateLayout.measure_norms``)."""

    rows: list[NDArray[np.floating]]
    carried: dict[str, NDArray[np.generic]]
    norm: float


def prepare_update(data: bytes, layout: UpdateLayout, own: NamedLayers | None = None, *,
                   values_checked: bool = False) -> PreparedUpdate:
    """Decode and check an update blob against the job's base (names, order, shapes, dtypes, finite
    values; a compressed one's declared sizes before it is expanded), move it onto the base when it
    was trained from another model ``own``, clip it, and lay out its rows. ``values_checked``:
    the bytes passed ``check_update`` already (a dense update's finite values are not checked
    twice). Raises :class:`InvalidTensor` with the reason."""
    base = layout.base
    spec = spec_of(base)
    if own is None or is_compressed(data):
        layers = decode_update(data, spec, max_bytes=layout.max_bytes, base=base, values_checked=values_checked)
    else:
        model = decode_update(data, spec, max_bytes=layout.max_bytes, values_checked=values_checked)
        if spec_of(own) != spec:
            raise InvalidTensor("bad_layers", "the model the update was trained from has another layout")
        layers = {name: rebased(base[name], model[name], own[name]) for name in model}
    if layout.clip_norm is not None:
        layers = clip_update(base, layers, layout.clip_norm, layout.clip_norm_type)
    rows = [update_row(layers[name], base[name], layout.rows) for name in layout.trained]
    norm = row_distance(rows, layout.global_layers, layout.rows) if layout.measure_norms else math.nan
    return PreparedUpdate(rows, {name: layers[name] for name in layout.carried}, norm)


def update_row(layer: NDArray[np.generic], base: NDArray[np.generic], rows: Rows) -> NDArray[np.floating]:
    """The update's row for one layer, in the dtype the rules compute that layer in: the layer itself
    (a view, but for half precision), or its difference from ``base``."""
    if rows is Rows.MODELS:
        return for_rules(layer)
    dtype = slab_dtype(for_rules(base))
    difference = np.subtract(layer, base, dtype=dtype) if rows is Rows.DELTAS else np.subtract(base, layer, dtype=dtype)
    return np.asarray(difference)


def row_distance(rows: list[NDArray[np.floating]], global_layers: tuple[NDArray[np.floating], ...],
                 kind: Rows) -> float:
    """||rows - reference||_2 over all layers, in float64 (reference: the global model for model
    rows, else zero)."""
    total = 0.0
    for row, glob in zip(rows, global_layers, strict=True):
        flat = row.reshape(-1)
        if kind is Rows.MODELS:
            total += float(squared_distance(flat, np.ascontiguousarray(glob).reshape(-1)))
        else:
            total += float(squared_norm(flat))
    return math.sqrt(total)
