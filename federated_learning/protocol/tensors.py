"""Tensor codec: named layers <-> safetensors bytes, addressed by SHA-256.

Never pickle: safetensors holds only a JSON header and raw little-endian data,
so decoding untrusted bytes cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from federated_learning.types import BlobDigest, NamedLayers

ALLOWED_DTYPES = frozenset({"float32", "float64"})
"""Dtypes of models and updates. Server-internal blobs (aggregation rule state) may also hold integers."""
STATE_DTYPES = ALLOWED_DTYPES | {"int64", "int32"}
_HEADER_LEN_BYTES = 8
_MAX_HEADER_BYTES = 1 << 20


class InvalidTensor(ValueError):
    """A blob or a layer that fails validation; ``reason`` is a short tag for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


LayerSpec = Mapping[str, tuple[tuple[int, ...], str]]
"""Layer name -> (shape, dtype name), in model order."""


def digest_of(data: bytes) -> BlobDigest:
    """Lower-case hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def encode_layers(layers: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named layers to safetensors bytes (layer order kept in the metadata)."""
    arrays = {name: np.ascontiguousarray(value) for name, value in layers.items()}
    return bytes(_st_save(arrays, metadata={"order": json.dumps(list(arrays))}))


def _read_header(data: bytes) -> dict[str, object]:
    if len(data) < _HEADER_LEN_BYTES:
        raise InvalidTensor("bad_blob", f"blob of {len(data)} bytes is too short for safetensors")
    (header_len,) = struct.unpack("<Q", data[:_HEADER_LEN_BYTES])
    if header_len > _MAX_HEADER_BYTES or _HEADER_LEN_BYTES + header_len > len(data):
        raise InvalidTensor("bad_blob", f"safetensors header length {header_len} is invalid")
    try:
        header = json.loads(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len])
    except ValueError as exc:
        raise InvalidTensor("bad_blob", f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidTensor("bad_blob", "safetensors header is not an object")
    return header


def decode_layers(data: bytes, *, max_bytes: int, allowed_dtypes: frozenset[str] = ALLOWED_DTYPES) -> NamedLayers:
    """Parse safetensors bytes into named layers, in the order they were saved.

    Raises :class:`InvalidTensor` when the blob is too large, malformed, or holds a
    dtype other than float32/float64.
    """
    if len(data) > max_bytes:
        raise InvalidTensor("too_large", f"blob of {len(data)} bytes exceeds the limit {max_bytes}")
    header = _read_header(data)
    try:
        arrays = _st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise InvalidTensor("bad_blob", f"not a safetensors blob: {exc}") from exc
    metadata = header.get("__metadata__")
    order: list[str] = list(arrays)
    if isinstance(metadata, dict) and isinstance(metadata.get("order"), str):
        try:
            saved_order = json.loads(metadata["order"])
        except ValueError:
            saved_order = None
        if isinstance(saved_order, list) and sorted(saved_order) == sorted(arrays):
            order = [str(name) for name in saved_order]
    for name in order:
        if arrays[name].dtype.name not in allowed_dtypes:
            raise InvalidTensor("bad_dtype", f"layer '{name}' has dtype {arrays[name].dtype.name}")
    return {name: arrays[name] for name in order}


def spec_of(layers: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The layer spec (names, shapes, dtypes) of a model."""
    return {name: (tuple(int(n) for n in a.shape), a.dtype.name) for name, a in layers.items()}


def validate_layers(layers: Mapping[str, np.ndarray], spec: LayerSpec) -> None:
    """Check names, shapes, dtypes and finiteness against ``spec``; raise :class:`InvalidTensor`."""
    if list(layers) != list(spec):
        missing = sorted(set(spec) - set(layers))
        extra = sorted(set(layers) - set(spec))
        if not missing and not extra:
            raise InvalidTensor(
                "bad_layers", f"layers are in the order {list(layers)}; the model's order is {list(spec)}"
            )
        raise InvalidTensor(
            "bad_layers", f"layer names differ from the model: missing {missing}, unexpected {extra}"
        )
    for name, (shape, dtype) in spec.items():
        array = layers[name]
        if tuple(array.shape) != tuple(shape):
            raise InvalidTensor(
                "bad_shape", f"layer '{name}' has shape {tuple(array.shape)}; expected {tuple(shape)}"
            )
        if array.dtype.name != dtype:
            raise InvalidTensor(
                "bad_dtype", f"layer '{name}' has dtype {array.dtype.name}; expected {dtype}"
            )
        if not np.isfinite(array).all():
            raise InvalidTensor("not_finite", f"layer '{name}' contains NaN or Inf")
