"""Tensor codec: named layers <-> safetensors bytes, addressed by SHA-256.

Never pickle: safetensors holds only a JSON header and raw little-endian data,
so decoding untrusted bytes cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save as _st_save

from federated_learning.types import BlobDigest, NamedLayers

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
"""Layers of these dtypes are trained: aggregated by the training's rule, clipped, noised, masked."""
INTEGER_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"})
"""Layers of these dtypes (counters such as BatchNorm's ``num_batches_tracked``) are carried, not
averaged: see :func:`federated_learning.protocol.layouts.carry_integer_layers`."""
ALLOWED_DTYPES = FLOAT_DTYPES | INTEGER_DTYPES
"""Dtypes of models and updates."""
STATE_DTYPES = ALLOWED_DTYPES
"""Server-internal blobs (aggregation rule state)."""
_SAFETENSORS_DTYPES: dict[str, np.dtype[Any]] = {
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
_HEADER_LEN_BYTES = 8
_MAX_HEADER_BYTES = 1 << 20
_MAX_DIMENSIONS = 32
"""NumPy's limit is 64; no model layer needs more than a few."""


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
    # np.ascontiguousarray would make a 0-d layer (a counter) 1-d.
    arrays = {name: np.array(value, order="C", copy=None) for name, value in layers.items()}
    return bytes(_st_save(arrays, metadata={"order": json.dumps(list(arrays))}))


def _read_header(data: bytes, size: int | None = None) -> dict[str, object]:
    """The JSON header of a safetensors blob of ``size`` bytes (``len(data)`` when None) whose
    first bytes are ``data``."""
    size = len(data) if size is None else size
    if size < _HEADER_LEN_BYTES:
        raise InvalidTensor("bad_blob", f"blob of {size} bytes is too short for safetensors")
    (header_len,) = struct.unpack("<Q", data[:_HEADER_LEN_BYTES])
    if header_len > _MAX_HEADER_BYTES or _HEADER_LEN_BYTES + header_len > size:
        raise InvalidTensor("bad_blob", f"safetensors header length {header_len} is invalid")
    if _HEADER_LEN_BYTES + header_len > len(data):
        raise ValueError(f"the header needs {_HEADER_LEN_BYTES + header_len} leading bytes; given {len(data)}")
    try:
        header = json.loads(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len])
    except (ValueError, RecursionError) as exc:  # RecursionError: a deeply nested header
        raise InvalidTensor("bad_blob", f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidTensor("bad_blob", "safetensors header is not an object")
    return header


_Entry = tuple[int, int, str, np.dtype[Any], tuple[int, ...]]
"""A tensor of a safetensors blob: (begin, end) in the data section, name, dtype, shape."""


def _entries(header: dict[str, object], body_bytes: int) -> list[_Entry]:
    """The tensors a safetensors header describes, in data order, checked as the format requires
    (known dtypes, sizes that match shapes, offsets that tile a data section of ``body_bytes``)."""
    entries: list[_Entry] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise InvalidTensor("bad_blob", f"tensor '{name}' has no description")
        dtype = _SAFETENSORS_DTYPES.get(str(info.get("dtype")))
        if dtype is None:
            raise InvalidTensor("bad_dtype", f"layer '{name}' has dtype {info.get('dtype')!r}; "
                                             f"allowed: {sorted(_SAFETENSORS_DTYPES)}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) <= _MAX_DIMENSIONS
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise InvalidTensor("bad_blob", f"tensor '{name}' has an invalid shape {str(shape)[:100]}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise InvalidTensor("bad_blob", f"tensor '{name}' has invalid data offsets {str(offsets)[:100]}")
        count = 1
        for n in shape:
            count *= n
        if offsets[1] - offsets[0] != count * dtype.itemsize:
            raise InvalidTensor("bad_blob", f"tensor '{name}' holds {offsets[1] - offsets[0]} bytes; its shape "
                                            f"{tuple(shape)} of {dtype.name} needs {count * dtype.itemsize}")
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    entries.sort(key=lambda entry: (entry[0], entry[1], entry[2]))
    if entries and entries[-1][1] > body_bytes:
        raise InvalidTensor("bad_blob", f"the tensors need {entries[-1][1]} bytes of data; the blob holds {body_bytes}")
    position = 0
    for begin, end, name, _dtype, _shape in entries:
        if begin != position:
            raise InvalidTensor("bad_blob", f"tensor '{name}' starts at byte {begin}; expected {position}")
        position = end
    if position != body_bytes:
        raise InvalidTensor("bad_blob", f"the data section holds {body_bytes} bytes; the tensors cover {position}")
    return entries


def _arrays(data: bytes, header: dict[str, object]) -> dict[str, np.ndarray]:
    """The tensors of a safetensors blob, as read-only views of ``data``.

    Read here rather than by ``safetensors.numpy.load``, which has no bfloat16."""
    start = _HEADER_LEN_BYTES + int.from_bytes(data[:_HEADER_LEN_BYTES], "little")
    body = memoryview(data)[start:]
    arrays: dict[str, np.ndarray] = {}
    for begin, end, name, dtype, shape in _entries(header, len(body)):
        try:
            arrays[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
        except ValueError as exc:
            raise InvalidTensor("bad_blob", f"tensor '{name}' cannot be read: {exc}") from exc
    return arrays


def _saved_order(header: dict[str, object], names: list[str]) -> list[str]:
    """The metadata's ``order`` when it names exactly ``names`` (the blob's tensors in data
    order), else ``names``."""
    metadata = header.get("__metadata__")
    if isinstance(metadata, dict) and isinstance(metadata.get("order"), str):
        try:
            saved_order = json.loads(metadata["order"])
        except (ValueError, RecursionError):
            saved_order = None
        if isinstance(saved_order, list) and sorted(map(str, saved_order)) == sorted(names) \
                and len(saved_order) == len(names):
            return [str(name) for name in saved_order]
    return names


def header_bytes_needed(head: bytes) -> int:
    """How many leading bytes of a safetensors blob hold its header (length prefix included),
    read from its first 8 bytes; 8 when they are missing."""
    if len(head) < _HEADER_LEN_BYTES:
        return _HEADER_LEN_BYTES
    return _HEADER_LEN_BYTES + min(int.from_bytes(head[:_HEADER_LEN_BYTES], "little"), _MAX_HEADER_BYTES + 1)


def read_layout(head: bytes, size: int, *, max_bytes: int, allowed_dtypes: frozenset[str] = ALLOWED_DTYPES
                ) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, object]]:
    """The layer spec (in saved order) and the metadata of a safetensors blob of ``size`` bytes,
    from its first bytes ``head`` (at least :func:`header_bytes_needed`): every check of
    :func:`decode_layers` but those of the values, without reading them."""
    if size > max_bytes:
        raise InvalidTensor("too_large", f"blob of {size} bytes exceeds the limit {max_bytes}")
    header = _read_header(head, size)
    header_end = header_bytes_needed(head)
    entries = _entries(header, size - header_end)
    names = [name for _begin, _end, name, _dtype, _shape in entries]
    by_name = {name: (shape, dtype.name) for _begin, _end, name, dtype, shape in entries}
    spec = {name: by_name[name] for name in _saved_order(header, names)}
    for name, (_shape, dtype_name) in spec.items():
        if dtype_name not in allowed_dtypes:
            raise InvalidTensor("bad_dtype", f"layer '{name}' has dtype {dtype_name}")
    metadata = header.get("__metadata__")
    return spec, metadata if isinstance(metadata, dict) else {}


def decode_layers(data: bytes, *, max_bytes: int, allowed_dtypes: frozenset[str] = ALLOWED_DTYPES) -> NamedLayers:
    """Parse safetensors bytes into named layers, in the order they were saved.

    The order is the metadata's ``order`` entry when it names exactly the blob's tensors, else
    the order of the tensors' data in the blob (deterministic for the same bytes). Raises
    :class:`InvalidTensor` when the blob is too large, malformed, or holds a dtype outside
    ``allowed_dtypes``.
    """
    if len(data) > max_bytes:
        raise InvalidTensor("too_large", f"blob of {len(data)} bytes exceeds the limit {max_bytes}")
    header = _read_header(data)
    arrays = _arrays(data, header)
    order = _saved_order(header, list(arrays))
    for name in order:
        if arrays[name].dtype.name not in allowed_dtypes:
            raise InvalidTensor("bad_dtype", f"layer '{name}' has dtype {arrays[name].dtype.name}")
    return {name: arrays[name] for name in order}


def spec_of(layers: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The layer spec (names, shapes, dtypes) of a model."""
    return {name: (tuple(int(n) for n in a.shape), a.dtype.name) for name, a in layers.items()}


def describe(shape: tuple[int, ...], dtype: str) -> str:
    """``(10, 64) float32``: how layer layouts are quoted in every refusal."""
    return f"{tuple(shape)} {dtype}"


def is_float(dtype: str) -> bool:
    """Whether a layer of this dtype is trained (float16, bfloat16, float32, float64)."""
    return dtype in FLOAT_DTYPES


def layout_mismatch(received: LayerSpec, expected: LayerSpec) -> InvalidTensor | None:
    """The first difference between two layouts (names, order, shapes, dtypes), as the refusal
    that names the layer and both its expected and received shape and dtype; None when equal."""
    if list(received) != list(expected):
        missing = [name for name in expected if name not in received]
        extra = [name for name in received if name not in expected]
        if not missing and not extra:
            return InvalidTensor(
                "bad_layers", f"layers are in the order {list(received)}; the model's order is {list(expected)}")
        first = missing[0] if missing else extra[0]
        side = (f"layer '{first}' (expected {describe(*expected[first])}) is missing" if missing
                else f"layer '{first}' (received {describe(*received[first])}) is not in the model")
        return InvalidTensor("bad_layers", f"{side}; missing {missing[:10]}, unexpected {extra[:10]}")
    for name, (shape, dtype) in expected.items():
        got_shape, got_dtype = received[name]
        if tuple(got_shape) != tuple(shape) or got_dtype != dtype:
            reason = "bad_shape" if tuple(got_shape) != tuple(shape) else "bad_dtype"
            return InvalidTensor(reason, f"layer '{name}': expected {describe(shape, dtype)}, "
                                         f"received {describe(tuple(got_shape), got_dtype)}")
    return None


def validate_layers(layers: Mapping[str, np.ndarray], spec: LayerSpec, *, values: bool = True) -> None:
    """Check names, order, shapes, dtypes and (``values``) finiteness against ``spec``; raise
    :class:`InvalidTensor`."""
    problem = layout_mismatch(spec_of(layers), spec)
    if problem is not None:
        raise problem
    if not values:
        return
    for name, (_shape, dtype) in spec.items():
        if is_float(dtype) and not np.isfinite(layers[name]).all():
            raise InvalidTensor("not_finite", f"layer '{name}' contains NaN or Inf")
