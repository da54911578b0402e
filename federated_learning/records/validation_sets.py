"""Server-side validation sets: held-out data the operator gives the server, as ``.npz``.

Loaded with ``allow_pickle=False`` (arrays only): ``x`` (N, features) and ``y`` (N,) integer
labels. Used to score each committed version on one fixed data set, which the rollback
policy prefers over the agents' federated evaluations (those come from whichever agents
took part, so they move from round to round).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

MAX_VALIDATION_EXAMPLES = 1_000_000


class InvalidValidationSet(ValueError):
    """The file is missing, not an arrays-only .npz, or does not fit the model."""


@lru_cache(maxsize=16)
def load_validation_set(path: str, num_features: int, num_classes: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """``(x, y)`` from ``path``, checked against the model's input and label sizes."""
    try:
        with np.load(Path(path), allow_pickle=False) as archive:
            x, y = archive["x"], archive["y"]
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidValidationSet(f"validation data {path!r}: {exc}") from exc
    if x.ndim != 2 or x.shape[1] != num_features or y.shape != (x.shape[0],):
        raise InvalidValidationSet(f"validation data {path!r}: x {x.shape} and y {y.shape} do not fit a "
                                   f"model of {num_features} features")
    if not 0 < len(y) <= MAX_VALIDATION_EXAMPLES or not np.isfinite(x).all():
        raise InvalidValidationSet(f"validation data {path!r}: needs 1..{MAX_VALIDATION_EXAMPLES} finite examples")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise InvalidValidationSet(f"validation data {path!r}: labels must be integers in [0, {num_classes})")
    return x.astype(np.float32), y.astype(np.int64)
