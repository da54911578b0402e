"""Server-side validation sets: held-out data the operator gives the server, as ``.npz``.

A training names a file by its name inside the deployment's validation folder
(``validation_data_dir``, default ``<data_dir>/validation``); nothing outside that folder is
ever opened. The file is opened without blocking and without following links and must be a
regular file (a FIFO or a device is refused, not waited on), and every such refusal reads the
same, so the error tells nobody which files exist. Loaded with ``allow_pickle=False`` (arrays
only): ``x`` (N, features) and ``y`` (N,) integer labels. Used to score each committed version
on one fixed data set, which the rollback policy prefers over the agents' federated evaluations.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

MAX_VALIDATION_EXAMPLES = 1_000_000
MAX_VALIDATION_BYTES = 1 << 30
READ_TIMEOUT_S = 30.0
"""How long the coordinator waits for a validation file (read in a worker thread)."""


class InvalidValidationSet(ValueError):
    """The file is not a usable arrays-only .npz of the validation folder, or does not fit the model."""


def unusable(name: str) -> InvalidValidationSet:
    return InvalidValidationSet(
        f"validation data {name!r} is not a readable .npz file of the deployment's validation folder "
        "(give its name inside validation_data_dir)")


def validation_path(folder: Path, name: str) -> Path:
    """``name`` inside ``folder``: no absolute path, no '..', no link out of it."""
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise unusable(name)
    base = folder.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base) or path == base:
        raise unusable(name)
    return path


Parsed = tuple[NDArray[np.float32], NDArray[np.int64]]
_parsed: dict[tuple[str, int, int, int, int], Parsed] = {}
"""Recently parsed files by (path, mtime_ns, size, features, classes): each round scores a version
on the same file, which is read again only when it changed."""


def load_validation_set(folder: Path, name: str, num_features: int, num_classes: int) -> Parsed:
    """``(x, y)`` of validation file ``name``, checked against the model's input and label sizes."""
    path = validation_path(folder, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise unusable(name) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_VALIDATION_BYTES:
        os.close(fd)
        raise unusable(name)
    with os.fdopen(fd, "rb") as handle:
        key = (str(path), info.st_mtime_ns, info.st_size, num_features, num_classes)
        if key not in _parsed:
            parsed = parse_validation_set(handle.read(MAX_VALIDATION_BYTES + 1), name, num_features, num_classes)
            if len(_parsed) >= 16:
                _parsed.pop(next(iter(_parsed)))
            _parsed[key] = parsed
        return _parsed[key]


def parse_validation_set(data: bytes, name: str, num_features: int, num_classes: int) -> Parsed:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            x, y = archive["x"], archive["y"]
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise unusable(name) from exc
    if x.ndim != 2 or x.shape[1] != num_features or y.shape != (x.shape[0],):
        raise InvalidValidationSet(f"validation data {name!r}: x {x.shape} and y {y.shape} do not fit a "
                                   f"model of {num_features} features")
    if not 0 < len(y) <= MAX_VALIDATION_EXAMPLES or not np.issubdtype(x.dtype, np.number) \
            or not np.isfinite(x).all():
        raise InvalidValidationSet(f"validation data {name!r}: needs 1..{MAX_VALIDATION_EXAMPLES} finite examples")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise InvalidValidationSet(f"validation data {name!r}: labels must be integers in [0, {num_classes})")
    return x.astype(np.float32), y.astype(np.int64)
