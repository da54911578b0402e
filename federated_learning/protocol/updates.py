"""Update blobs as agents upload them: a dense model, or a compressed delta.

A dense blob holds the agent's new model layers (float32/float64). A compressed blob holds
the tensors of :class:`~federated_learning.privacy.compression.CompressedUpdate` (the delta
from the model the agent received, sparsified or quantized) and the safetensors metadata
``{"encoding": "compressed"}``. Both are validated the same way: shapes of the model,
finite values, within the size limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import save as _st_save

from federated_learning.privacy.compression import (
    CompressedUpdate,
    NonFiniteResult,
    decompress,
    decompress_onto,
)
from federated_learning.protocol.tensors import (
    ALLOWED_DTYPES,
    InvalidTensor,
    LayerSpec,
    decode_layers,
    is_float,
    layout_mismatch,
    read_layout,
    validate_layers,
)
from federated_learning.types import NamedLayers

COMPRESSED = "compressed"
COMPRESSED_DTYPES = frozenset({"uint8", "uint32", "int64", "float32"})


def encode_compressed(update: CompressedUpdate) -> bytes:
    """Safetensors bytes of a compressed delta."""
    tensors = {name: np.ascontiguousarray(array) for name, array in update.to_tensors().items()}
    return bytes(_st_save(tensors, metadata={"encoding": COMPRESSED, "order": json.dumps(list(tensors))}))


def _compressed_update(data: bytes, spec: LayerSpec, max_bytes: int) -> CompressedUpdate:
    """The compressed delta of a blob, its declared shapes equal to ``spec``'s (nothing expanded)."""
    tensors = decode_layers(data, max_bytes=max_bytes, allowed_dtypes=COMPRESSED_DTYPES)
    shapes = [tuple(shape) for shape, _dtype in spec.values()]
    try:
        update = CompressedUpdate.from_tensors(tensors)
    except (KeyError, ValueError, IndexError) as exc:
        raise InvalidTensor("bad_blob", f"not a valid compressed update: {exc}") from exc
    # The declared shapes are checked against the model before anything is expanded: a small
    # blob may declare any size.
    if [tuple(shape) for shape in update.shapes] != shapes:
        declared = [tuple(shape) for shape in update.shapes][:8]
        raise InvalidTensor("bad_shape", f"compressed update declares shapes {declared}; expected {shapes[:8]}")
    return update


def _expanded(expand: Callable[[], list[NDArray[np.generic]]], names: Sequence[str] = ()) -> list[NDArray[np.generic]]:
    """What ``expand`` returns; its errors as InvalidTensor (``names``: the layers it expands)."""
    try:
        return expand()
    except NonFiniteResult as exc:
        name = names[exc.layer] if exc.layer < len(names) else str(exc.layer)
        raise InvalidTensor("not_finite", f"layer '{name}' contains NaN or Inf once the update is applied to "
                                          "its base") from exc
    except (KeyError, ValueError, IndexError) as exc:
        raise InvalidTensor("bad_blob", f"not a valid compressed update: {exc}") from exc


def _compressed_delta(data: bytes, spec: LayerSpec, max_bytes: int) -> NamedLayers:
    """The float32 delta of a compressed blob, one array per layer of ``spec``."""
    update = _compressed_update(data, spec, max_bytes)
    layers = _expanded(lambda: list(decompress(update)))
    return {name: np.asarray(layer, dtype=np.float32) for name, layer in zip(spec, layers, strict=True)}


def trained_spec(spec: LayerSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """The float layers of a layout: what a compressed delta holds (integer layers are carried)."""
    return {name: (tuple(shape), dtype) for name, (shape, dtype) in spec.items() if is_float(dtype)}


def is_compressed(data: bytes) -> bool:
    """Whether the blob's safetensors metadata marks a compressed delta (cheap: header only)."""
    header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if header_len <= 0 or header_len > len(data) - 8:
        return False
    try:
        header = json.loads(data[8:8 + header_len])
    except ValueError:
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and metadata.get("encoding") == COMPRESSED


def decode_update(data: bytes, spec: LayerSpec, *, max_bytes: int,
                  base: Mapping[str, np.ndarray] | None = None, values_checked: bool = False) -> NamedLayers:
    """The update as model layers, validated against ``spec``.

    A compressed delta covers the float layers only. It becomes ``base + delta`` (integer layers
    as in ``base``) when ``base`` (the model the agent received) is given, else the float32 delta
    itself (enough to validate it). ``values_checked``: these very bytes passed
    :func:`check_update`, so a dense update's values are known to be finite and only its layout
    is compared (a compressed one's expansion is always checked).
    """
    if not is_compressed(data):
        layers = decode_layers(data, max_bytes=max_bytes)
        validate_layers(layers, spec, values=not values_checked)
        return layers
    floats = trained_spec(spec)
    if base is None:
        delta = _compressed_delta(data, floats, max_bytes)
        validate_layers(delta, {name: (shape, "float32") for name, (shape, _dtype) in floats.items()})
        return delta
    update = _compressed_update(data, floats, max_bytes)
    bases = [np.asarray(base[name]).astype(dtype, copy=False) for name, (_shape, dtype) in floats.items()]
    moved = dict(zip(floats, _expanded(lambda: decompress_onto(update, bases), list(floats)), strict=True))
    layers = {name: moved.get(name, base[name]) for name in spec}
    validate_layers(layers, spec, values=False)  # decompress_onto checked the values it wrote
    return layers


def check_update(data: bytes, spec: LayerSpec, *, max_bytes: int) -> None:
    """What can be checked of a whole update without the model it was trained from: a dense one
    completely (layout, finite values); a compressed one's structure, declared shapes and finite
    payload, without expanding it (its expansion is checked where it is applied to its base, by
    the job). Raises :class:`InvalidTensor`."""
    if not is_compressed(data):
        validate_layers(decode_layers(data, max_bytes=max_bytes), spec)
        return
    update = _compressed_update(data, trained_spec(spec), max_bytes)
    for name, array in update.arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidTensor("not_finite", f"compressed update tensor '{name}' contains NaN or Inf")


def check_update_layout(head: bytes, size: int, spec: LayerSpec, *, max_bytes: int) -> None:
    """What can be checked of an update blob of ``size`` bytes from its first bytes ``head`` (the
    whole safetensors header): the size limit, the format, and for a dense update the layers'
    names, order, shapes and dtypes. Its values (finite, a valid compressed delta) and its hash
    are checked where it is read whole, by the aggregator. Raises :class:`InvalidTensor`."""
    layout, metadata = read_layout(head, size, max_bytes=max_bytes, allowed_dtypes=ALLOWED_DTYPES)
    if metadata.get("encoding") == COMPRESSED:
        for name, (_shape, dtype) in layout.items():
            if dtype not in COMPRESSED_DTYPES:
                raise InvalidTensor("bad_dtype", f"compressed update tensor '{name}' has dtype {dtype}")
        return
    problem = layout_mismatch(layout, spec)
    if problem is not None:
        raise problem
