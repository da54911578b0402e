"""Update compression: top-k / random-k sparsification, 8- and 4-bit stochastic quantization.

Sources: top-k with error feedback, Stich, Cordonnier and Jaggi, "Sparsified SGD with
Memory", 2018, arXiv:1809.07599, and Karimireddy et al., "Error Feedback Fixes SignSGD and
other Gradient Compression Schemes", 2019, arXiv:1901.09847; unbiased stochastic
quantization, Alistarh et al., "QSGD", 2017, arXiv:1610.02132 (here with a per-block
min/step grid instead of QSGD's norm scaling).

An update (list of layers) is compressed as one flat vector. The encoded form holds only
numpy arrays (`CompressedUpdate.to_tensors`), so it can travel as safetensors, never pickle:
sparse forms keep uint32 indices and float32 values, quantized forms keep uint8 codes
(two 4-bit codes per byte) with a float32 minimum and step per block.

Order with differential privacy: clip, then compress, then noise.
1. The agent clips its update to C first: clipping fixes the sensitivity the accountant
   assumes, and must see the update the agent actually computed.
2. It compresses the clipped update (adding its error-feedback residual).
3. Noise comes last, on what is released: the server decompresses, re-clips each update
   to C with `clip_l2` (a no-op for top-k of a clipped vector; needed because the residual
   and unbiased quantization can raise the L2 norm above C), sums, and adds the central
   noise. This order applies to central DP only: local DP with compression is refused
   when the training is started (`TrainingConfig` in protocol/messages.py), because the
   agent's noise would have to be compressed with its update, and sparsifying or
   quantizing the noise would void the guarantee it was calibrated for.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from federated_learning.privacy.layers import Layers, flatten, shapes_of, unflatten

DEFAULT_BLOCK_SIZE = 1024
"""Coordinates per quantization block; each block costs 8 bytes of minimum and step."""

MAX_BLOCK_SIZE = 1 << 16
"""The largest block a quantized update may declare beyond its own size."""

_DENSE_BYTES_PER_VALUE = 4


class CompressionMethod(enum.IntEnum):
    """How an update was encoded; the integer is stored in the tensors."""

    TOP_K = 1
    RANDOM_K = 2
    QUANTIZE_8 = 3
    QUANTIZE_4 = 4


_SPARSE = (CompressionMethod.TOP_K, CompressionMethod.RANDOM_K)
_BITS = {CompressionMethod.QUANTIZE_8: 8, CompressionMethod.QUANTIZE_4: 4}


@dataclass(frozen=True)
class CompressedUpdate:
    """A compressed update: method, layer shapes and the payload arrays.

    Payload arrays by method: sparse -> "indices" (uint32, ascending), "values" (float32);
    quantized -> "codes" (uint8), "minimum" and "step" (float32, one per block).
    """

    method: CompressionMethod
    shapes: tuple[tuple[int, ...], ...]
    arrays: Mapping[str, NDArray[np.generic]]
    block_size: int = 0
    size: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "size", sum(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes)
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the payload arrays (layer shapes excluded: a dense upload needs them too)."""
        return sum(int(array.nbytes) for array in self.arrays.values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same update as dense float32."""
        return _DENSE_BYTES_PER_VALUE * self.size

    def get_ratio(self) -> float:
        """Compression ratio: dense float32 bytes / compressed bytes (4.0 for 8-bit codes)."""
        return self.dense_nbytes / self.nbytes if self.nbytes else math.inf

    def bytes_saved(self) -> int:
        """Dense float32 bytes minus compressed bytes."""
        return self.dense_nbytes - self.nbytes

    def to_tensors(self) -> dict[str, NDArray[np.generic]]:
        """Flat name -> array mapping, ready for `safetensors.numpy.save`."""
        tensors: dict[str, NDArray[np.generic]] = {
            "method": np.array([int(self.method)], dtype=np.uint8),
            "block_size": np.array([self.block_size], dtype=np.int64),
            "shape_ndims": np.array([len(shape) for shape in self.shapes], dtype=np.int64),
            "shape_dims": np.array([d for shape in self.shapes for d in shape], dtype=np.int64),
        }
        tensors.update({f"payload.{name}": np.ascontiguousarray(array)
                        for name, array in self.arrays.items()})
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, NDArray[np.generic]]) -> CompressedUpdate:
        """Inverse of `to_tensors`."""
        method = CompressionMethod(int(tensors["method"][0]))
        dims = [int(d) for d in tensors["shape_dims"]]
        shapes: list[tuple[int, ...]] = []
        for ndim in (int(n) for n in tensors["shape_ndims"]):
            shapes.append(tuple(dims[:ndim]))
            dims = dims[ndim:]
        arrays = {name.removeprefix("payload."): array for name, array in tensors.items()
                  if name.startswith("payload.")}
        return cls(method, tuple(shapes), arrays, int(tensors["block_size"][0]))


Compressor = Callable[[Layers], CompressedUpdate]


def keep_count(num_values: int, fraction: float) -> int:
    """How many of num_values coordinates a sparsifier keeping `fraction` of them keeps (>= 1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"kept fraction must be in (0, 1]; got {fraction}")
    return max(1, min(num_values, round(num_values * fraction)))


def _sparse(method: CompressionMethod, layers: Layers, indices: NDArray[np.integer],
            values: NDArray[np.floating]) -> CompressedUpdate:
    order = np.argsort(indices, kind="stable")
    return CompressedUpdate(
        method, tuple(shapes_of(layers)),
        {"indices": indices[order].astype(np.uint32), "values": values[order].astype(np.float32)},
    )


def _check_k(k: int, size: int) -> None:
    if size >= 2**32:
        raise ValueError(f"sparse updates index with uint32; update has {size} values")
    if not 1 <= k <= size:
        raise ValueError(f"k must be in [1, {size}]; got {k}")


def top_k(layers: Layers, k: int) -> CompressedUpdate:
    """Keep the k coordinates of largest magnitude (ties broken arbitrarily)."""
    flat = flatten(layers)
    _check_k(k, flat.size)
    indices = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
    return _sparse(CompressionMethod.TOP_K, layers, indices, flat[indices])


def random_k(
    layers: Layers, k: int, rng: np.random.Generator, *, unbiased: bool = False
) -> CompressedUpdate:
    """Keep k coordinates chosen uniformly without replacement.

    With unbiased=True kept values are scaled by d/k so the decompressed vector's
    expectation is the input (higher variance); the default keeps them as they are, the
    contractive form meant for error feedback.
    """
    flat = flatten(layers)
    _check_k(k, flat.size)
    indices = rng.choice(flat.size, size=k, replace=False)
    values = flat[indices] * (np.float32(flat.size / k) if unbiased else np.float32(1.0))
    return _sparse(CompressionMethod.RANDOM_K, layers, indices, values)


def _block_grid(
    lowest: NDArray[np.float64], highest: NDArray[np.float64], levels: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Per-block float32 (minimum, step) whose grid minimum + [0, levels] * step covers each block's
    [lowest, highest].

    The minimum is rounded down and the step up in float32, so every value maps into
    [0, levels] and stochastic rounding needs no clamping, which would bias it.
    """
    minimum = lowest.astype(np.float32)
    below = minimum.astype(np.float64) > lowest
    minimum[below] = np.nextafter(minimum[below], np.float32(-np.inf))
    span = highest - minimum.astype(np.float64)
    step = (span / levels).astype(np.float32)
    short = minimum.astype(np.float64) + levels * step.astype(np.float64) < highest
    step[short] = np.nextafter(step[short], np.float32(np.inf))
    return minimum, step


QUANTIZE_CHUNK_VALUES = 1 << 16
"""Values NumPy decompresses per pass, so that its float64 temporaries stay in the CPU's cache."""


def quantize(
    layers: Layers, bits: int, rng: np.random.Generator, block_size: int = DEFAULT_BLOCK_SIZE
) -> CompressedUpdate:
    """Unbiased stochastic quantization to 2**bits levels per block of block_size values.

    With t = (x - min) / step in [0, L], L = 2**bits - 1, the code is floor(t) + 1 with
    probability t - floor(t), else floor(t); decoded min + code * step has expectation x (to within
    2**-31 of a step: the draws are 31 bits, see
    :data:`~federated_learning.privacy.quantization_kernels.UNIFORM_SCALE`). bits is 8 (one code
    per byte) or 4 (two codes per byte, low nibble first). ``rng`` gives one uint64 per update, the
    seed of the per-value draws (:func:`~federated_learning.privacy.quantization_kernels.draw`).
    """
    flat = (np.concatenate([np.asarray(layer).ravel() for layer in layers]) if len(layers)
            else np.zeros(0, np.float32))
    if flat.dtype not in (np.float32, np.float64):  # half precision, integers: the kernel reads these two
        flat = flat.astype(np.float64)
    return _quantize_flat(flat, tuple(shapes_of(layers)), bits, rng, block_size, None)


def _quantize_flat(flat: NDArray[np.floating], shapes: tuple[tuple[int, ...], ...], bits: int,
                   rng: np.random.Generator, block_size: int,
                   residual: NDArray[np.float32] | None) -> CompressedUpdate:
    """`quantize` of a flat vector; ``residual``, when given, receives flat minus the decoded values."""
    method = {8: CompressionMethod.QUANTIZE_8, 4: CompressionMethod.QUANTIZE_4}.get(bits)
    if method is None:
        raise ValueError(f"quantization bits must be 8 or 4; got {bits}")
    if block_size < 1:
        raise ValueError(f"block size must be >= 1; got {block_size}")
    from federated_learning.privacy.quantization_kernels import stochastic_codes

    levels = 2**bits - 1
    lowest, highest = _block_ranges(flat, block_size)
    if not (np.isfinite(lowest).all() and np.isfinite(highest).all()):  # NaN reaches both
        raise ValueError("cannot quantize an update with NaN or infinite values")
    minimum, step = _block_grid(lowest, highest, levels)
    codes = np.empty(flat.size, np.uint8)
    seed = rng.integers(0, 1 << 64, dtype=np.uint64)
    stochastic_codes(flat, block_size, minimum, step, levels, seed, codes,
                     np.empty(0, np.float32) if residual is None else residual)
    if bits == 4:
        codes = np.pad(codes, (0, codes.size % 2))
        codes = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8, copy=False)
    return CompressedUpdate(method, shapes, {"codes": codes, "minimum": minimum, "step": step},
                            block_size)


def _block_ranges(flat: NDArray[np.floating], block_size: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Each block's minimum and maximum in float64 (NumPy's reductions propagate NaN); none for an
    empty update."""
    whole = flat.size - flat.size % block_size
    rows = flat[:whole].reshape(-1, block_size)
    lowest, highest = [rows.min(axis=1)], [rows.max(axis=1)]
    if whole < flat.size:
        lowest.append(flat[whole:].min(keepdims=True))
        highest.append(flat[whole:].max(keepdims=True))
    return (np.concatenate(lowest).astype(np.float64, copy=False),
            np.concatenate(highest).astype(np.float64, copy=False))


@dataclass(frozen=True)
class Quantizer:
    """:func:`quantize` as a :data:`Compressor`; :class:`ErrorFeedback` takes the residual of a
    Quantizer from the quantizing pass itself instead of decoding the update again."""

    bits: int
    rng: np.random.Generator
    block_size: int = DEFAULT_BLOCK_SIZE

    def __call__(self, layers: Layers) -> CompressedUpdate:
        return quantize(layers, self.bits, self.rng, self.block_size)


def quantized_codes_fit(compressed: CompressedUpdate) -> None:
    """Raise ValueError unless a quantized update holds exactly its codes (one byte per 8-bit
    code, two 4-bit codes per byte) and one float32 minimum and step per block of block_size >= 1
    (at most the update's size or :data:`MAX_BLOCK_SIZE`)."""
    size, block_size = compressed.size, compressed.block_size
    # Expanding pads the last block to block_size values: an agent's huge block size must not
    # make the server allocate it.
    blocks = -(-size // block_size) if 1 <= block_size <= max(size, MAX_BLOCK_SIZE) else -1
    packed = size if compressed.method == CompressionMethod.QUANTIZE_8 else (size + 1) // 2
    codes = np.asarray(compressed.arrays["codes"])
    if blocks < 0 or codes.dtype != np.uint8 or codes.size != packed or any(
            np.asarray(compressed.arrays[name]).dtype != np.float32
            or np.asarray(compressed.arrays[name]).size != blocks for name in ("minimum", "step")):
        raise ValueError(f"a quantized update of {size} values needs {packed} uint8 code bytes and one "
                         f"float32 minimum and step per block of 1 <= block_size <= max(size, {MAX_BLOCK_SIZE})")


def _quantized_arrays(compressed: CompressedUpdate) -> tuple[NDArray[np.uint8], int, NDArray[np.float32],
                                                            NDArray[np.float32]]:
    quantized_codes_fit(compressed)
    arrays = compressed.arrays
    return (np.ascontiguousarray(np.asarray(arrays["codes"]).reshape(-1)), _BITS[compressed.method],
            np.ascontiguousarray(np.asarray(arrays["minimum"]).reshape(-1)),
            np.ascontiguousarray(np.asarray(arrays["step"]).reshape(-1)))


def decompress(compressed: CompressedUpdate) -> list[NDArray[np.float32]]:
    """Dense float32 layers of the original shapes (a value beyond float32's range becomes
    infinite: whoever applies the delta refuses it)."""
    flat = np.zeros(compressed.size, dtype=np.float32)
    if compressed.method in _SPARSE:
        indices = np.asarray(compressed.arrays["indices"], dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= compressed.size):
            raise ValueError(f"sparse indices must be in [0, {compressed.size})")
        flat[indices] = compressed.arrays["values"]
    else:
        codes, bits, minimum, step = _quantized_arrays(compressed)
        if bits == 4:
            codes = np.stack([codes & 0x0F, codes >> 4], axis=1).ravel()
        block_size = compressed.block_size
        chunk_blocks = max(1, QUANTIZE_CHUNK_VALUES // block_size)
        for first in range(0, minimum.size, chunk_blocks):  # in cache
            last = min(minimum.size, first + chunk_blocks)
            start, stop = first * block_size, min(last * block_size, compressed.size)
            by_block = np.zeros((last - first) * block_size, np.uint8)
            by_block[: stop - start] = codes[start:stop]
            with np.errstate(over="ignore"):
                flat[start:stop] = (minimum[first:last].astype(np.float64)[:, None]
                                    + by_block.reshape(last - first, block_size)
                                    * step[first:last].astype(np.float64)[:, None]).ravel()[: stop - start]
    return [np.asarray(layer, dtype=np.float32) for layer in unflatten(flat, compressed.shapes)]


class NonFiniteResult(ValueError):
    """A decompressed delta that overflows on its base: the update's model holds NaN or Inf in
    layer ``layer`` (an index into the bases)."""

    def __init__(self, layer: int) -> None:
        super().__init__(f"layer {layer} of the update's model contains NaN or Inf")
        self.layer = layer


def decompress_onto(compressed: CompressedUpdate,
                    bases: Sequence[NDArray[np.generic]]) -> list[NDArray[np.generic]]:
    """Each base layer plus its part of the decompressed delta, in float64, rounded to the base
    layer's dtype: ``(base.astype(float64) + decompress(compressed)[i]).astype(base.dtype)``, in one
    pass per float32 layer of a quantized update (no dense delta is built for those), by a Numba
    kernel. Raises :class:`NonFiniteResult` when a value of the result is NaN or Inf."""
    if [tuple(base.shape) for base in bases] != [tuple(shape) for shape in compressed.shapes]:
        raise ValueError(f"the update has shapes {list(compressed.shapes)[:8]}; the bases "
                         f"{[tuple(base.shape) for base in bases][:8]}")
    if compressed.method in _SPARSE or any(base.dtype != np.float32 for base in bases):
        with np.errstate(over="ignore"):  # found below, as the kernel finds it
            moved = [(np.asarray(base).astype(np.float64) + delta).astype(base.dtype)
                     for base, delta in zip(bases, decompress(compressed), strict=True)]
        for k, layer in enumerate(moved):
            if not np.isfinite(layer).all():
                raise NonFiniteResult(k)
        return moved
    from federated_learning.privacy.quantization_kernels import dequantize_onto

    codes, bits, minimum, step = _quantized_arrays(compressed)
    layers: list[NDArray[np.generic]] = []
    start = 0
    for k, base in enumerate(bases):
        out = np.empty(base.shape, np.float32)
        if not dequantize_onto(codes, bits, minimum, step, compressed.block_size, start,
                               np.ascontiguousarray(base).reshape(-1), out.reshape(-1)):
            raise NonFiniteResult(k)
        layers.append(out)
        start += base.size
    return layers


class ErrorFeedback:
    """Per-agent residual memory: what compression dropped is added to the next update.

    compress: corrected = update + residual; sent = compressor(corrected);
    residual <- corrected - decompress(sent).
    """

    def __init__(self) -> None:
        self._residuals: dict[str, NDArray[np.float32]] = {}

    def compress(self, agent_id: str, layers: Layers, compressor: Compressor) -> CompressedUpdate:
        """Compress layers plus this agent's residual, and keep the new residual."""
        flat = flatten(layers)
        residual = self._residuals.get(agent_id)
        if residual is not None:
            if residual.size != flat.size:
                raise ValueError(
                    f"agent '{agent_id}' update has {flat.size} values; its residual has "
                    f"{residual.size} (model changed shape? call reset first)"
                )
            np.add(flat, residual, out=flat)  # flatten made a copy of its own
        if isinstance(compressor, Quantizer):
            # The old residual is in ``flat`` now: its buffer takes the new one.
            kept = np.empty(flat.size, np.float32) if residual is None else residual
            sent = _quantize_flat(flat, tuple(shapes_of(layers)), compressor.bits, compressor.rng,
                                  compressor.block_size, kept)
        else:
            sent = compressor(unflatten(flat, shapes_of(layers)))
            kept = flat - flatten(decompress(sent))
        self._residuals[agent_id] = kept
        return sent

    def residual(self, agent_id: str) -> NDArray[np.float32] | None:
        """The agent's residual as a flat float32 vector; None before its first update."""
        residual = self._residuals.get(agent_id)
        return None if residual is None else residual.copy()

    def reset(self, agent_id: str) -> None:
        """Forget the agent's residual (e.g. when the model architecture changes)."""
        self._residuals.pop(agent_id, None)
