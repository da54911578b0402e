"""Numba kernels that expand 8- and 4-bit quantized updates (the server's side of compression).

Kept apart from :mod:`federated_learning.privacy.compression` so that agents, which only
compress, never import Numba. The arithmetic is NumPy's reference (``decompress``) step for
step, in float64 with one rounding to float32, so both give the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit


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
    in float64 (a decompressed delta), j = start + i and b = j // block_size.

    c_j is code j: byte j (8 bits), or nibble j of the packed bytes, low nibble first (4 bits).
    codes: uint8; minimum, step: float32, one per block; base, out: (n,) float32. One pass, a
    block at a time (each block's loop has a constant minimum and step, so it vectorises), no
    temporaries; the typed wrapper
    :func:`~federated_learning.privacy.compression.decompress_onto` checks the sizes first.
    """
    i = 0
    while i < out.size:
        b = (start + i) // block_size
        end = min(out.size, (b + 1) * block_size - start)
        low, width = np.float64(minimum[b]), np.float64(step[b])
        if bits == 8:
            _onto_8(codes[start + i:start + end], low, width, base[i:end], out[i:end])
        else:
            _onto_4(codes, start + i, low, width, base[i:end], out[i:end])
        i = end
