"""Numba kernels of 8- and 4-bit block quantization: the agents' side (stochastic codes, with the
error-feedback residual) and the server's (expanding codes onto the base model).

The typed wrappers in :mod:`federated_learning.privacy.compression` check sizes and import this
module only when an update is quantized or expanded, so an agent that sends dense updates never
loads Numba. Each kernel works on one update and releases the GIL (``nogil``): the agents' worker
threads and the aggregator's readers run one update each, in parallel, which is where the
parallelism is (a ``parallel=True`` kernel launched from several threads at once would need a
thread-safe Numba threading layer and would oversubscribe the cores).

The arithmetic is the NumPy reference's (``decompress``) step for step, in float64 with one
rounding to float32, so both give the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from federated_learning.numeric import all_finite

UNIFORM_SCALE = 2.0**31
"""Stochastic rounding compares a 31-bit draw u with fraction * 2**31: P(round up) is the fraction
rounded up to a multiple of 2**-31, unbiased to within 2**-31 of a step (float32 keeps 24 bits)."""

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, nogil=True)
def draw(seed, index):  # type: ignore[no-untyped-def]
    """Value ``index``'s draw: the top 31 bits of output ``index + 1`` of SplitMix64 (Steele, Lea
    and Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014) started at ``seed``,
    as an int32. ``seed`` must be a NumPy uint64 (a Python int would make the sum float64).
    Computed from the index alone, so the draws need no memory, no order and no generator calls,
    and the loop that uses them still vectorises (31 bits convert to float64 with AVX2; 32 would
    not)."""
    z = seed + np.uint64(index + 1) * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return np.int32((z ^ (z >> np.uint64(31))) >> np.uint64(33))


@njit(cache=True, nogil=True)
def _codes_of_block(values, low, width, top, seed, first, codes):  # type: ignore[no-untyped-def]
    for j in range(values.size):  # branch-free over slices of one block, so that it vectorises
        scaled = (np.float64(values[j]) - low) / width
        lower = np.floor(scaled)
        up = np.float64(draw(seed, first + j)) < (scaled - lower) * UNIFORM_SCALE
        codes[j] = np.uint8(min(lower + up, top))


@njit(cache=True, nogil=True)
def _residual_of_block(values, low, width, codes, residual):  # type: ignore[no-untyped-def]
    for j in range(values.size):
        residual[j] = np.float32(values[j]) - np.float32(low + np.float64(codes[j]) * width)


@njit(cache=True, nogil=True)
def stochastic_codes(  # type: ignore[no-untyped-def]
        values, block_size, minimum, step, levels, seed, codes, residual):
    """codes[i] = min(floor(t) + (draw(seed, i) < frac(t) * 2**31), levels) for
    t = (values[i] - minimum[b]) / step[b] in float64 (step 0 counts as 1), b = i // block_size.
    (The minimum is needed only where float64 rounding puts a block's maximum a hair above
    ``levels``.)

    When ``residual`` has values.size entries it receives values[i] minus the decoded value
    float32(minimum[b] + codes[i] * step[b]) (what error feedback keeps), in float32; give it
    zero entries to skip that.
    """
    top = np.float64(levels)
    for k in range(-(-values.size // block_size)):
        i = k * block_size
        end = min(values.size, i + block_size)
        low = np.float64(minimum[k])
        width = np.float64(step[k])
        _codes_of_block(values[i:end], low, width if width > 0 else 1.0, top, seed, i, codes[i:end])
        if residual.size == values.size:
            _residual_of_block(values[i:end], low, width, codes[i:end], residual[i:end])


@njit(cache=True, nogil=True)
def _onto_8(codes, low, width, base, out):  # type: ignore[no-untyped-def]
    for t in range(out.size):
        delta = np.float32(low + np.float64(codes[t]) * width)
        out[t] = np.float32(np.float64(base[t]) + np.float64(delta))


@njit(cache=True, nogil=True)
def _onto_4(packed, first, low, width, base, out):  # type: ignore[no-untyped-def]
    for t in range(out.size):
        j = first + t
        delta = np.float32(low + np.float64((packed[j >> 1] >> (4 * (j & 1))) & 15) * width)
        out[t] = np.float32(np.float64(base[t]) + np.float64(delta))


@njit(cache=True, nogil=True)
def dequantize_onto(codes, bits, minimum, step, block_size, start, base, out):  # type: ignore[no-untyped-def]
    """out[i] = float32(base[i] + delta_j) in float64, with delta_j = float32(minimum[b] + c_j * step[b])
    in float64 (a decompressed delta), j = start + i and b = j // block_size. Returns whether every
    out[i] is finite (checked a block at a time while it is in cache).

    c_j is code j: byte j (8 bits), or nibble j of the packed bytes, low nibble first (4 bits).
    codes: uint8; minimum, step: float32, one per block; base, out: (n,) float32. One pass, a
    block at a time (each block's loop has a constant minimum and step, so it vectorises), no
    temporaries; the typed wrapper
    :func:`~federated_learning.privacy.compression.decompress_onto` checks the sizes first.
    """
    finite = True
    i = 0
    while i < out.size:
        b = (start + i) // block_size
        end = min(out.size, (b + 1) * block_size - start)
        low, width = np.float64(minimum[b]), np.float64(step[b])
        if bits == 8:
            _onto_8(codes[start + i:start + end], low, width, base[i:end], out[i:end])
        else:
            _onto_4(codes, start + i, low, width, base[i:end], out[i:end])
        finite = all_finite(out[i:end]) and finite
        i = end
    return finite
