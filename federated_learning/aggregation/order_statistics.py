"""Coordinate-wise order statistics of K updates: sorting networks vectorised across coordinates.

For every coordinate c, the K values x_1[c], ..., x_K[c] go through a fixed sequence
of compare-exchange operations (Batcher's odd-even merge sort, Batcher 1968, "Sorting
networks and their applications", pruned to what the caller needs). Running the same
network on LANES neighbouring coordinates at once turns each compare-exchange into one
vector min and one vector max, with no data-dependent branches; the only scratch is a
(K, LANES) tile per thread, never a K x d copy.

Pruning: walking the network backwards, a compare-exchange is dropped when both of its
positions flow, untouched by any kept comparator, into the same output group (or both
into no output): swapping two values of one summed group cannot change its sum.
"""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

LANES = 64
ORDER_CHUNK = 2048
# Row stride of the per-thread buffer, in elements: ORDER_CHUNK plus one cache line, so
# that the K row segments of a tile do not all map to the same L1 cache set.
BUFFER_STRIDE = ORDER_CHUNK + 16
UNUSED = -1
LIVE = -2


def batcher_network(n: int) -> list[tuple[int, int]]:
    """Compare-exchange pairs (i < j) of Batcher's odd-even merge sort for n inputs."""
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    # Inputs n..size-1 act as +inf padding: comparators touching them never move a value.
    return [(a, b) for a, b in pairs if b < n]


def prune_network(pairs: list[tuple[int, int]], groups: list[int]) -> list[tuple[int, int]]:
    """Drop comparators that cannot change the per-group sums; groups[p] = UNUSED drops p."""
    state = list(groups)
    kept: list[tuple[int, int]] = []
    for a, b in reversed(pairs):
        if state[a] != LIVE and state[a] == state[b]:
            continue
        kept.append((a, b))
        state[a] = LIVE
        state[b] = LIVE
    kept.reverse()
    return kept


def network_arrays(pairs: list[tuple[int, int]]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Read-only (first, second) index arrays of a comparator list."""
    first = np.asarray([a for a, _ in pairs], dtype=np.int64)
    second = np.asarray([b for _, b in pairs], dtype=np.int64)
    first.flags.writeable = False
    second.flags.writeable = False
    return first, second


@lru_cache(maxsize=256)
def range_network(n: int, lo: int, hi: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Network after which positions lo..hi-1 hold, as a multiset, sorted(x)[lo:hi]."""
    groups = [0 if lo <= p < hi else UNUSED for p in range(n)]
    return network_arrays(prune_network(batcher_network(n), groups))


@lru_cache(maxsize=256)
def sorting_network(n: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Network after which every position p holds sorted(x)[p]."""
    return network_arrays(batcher_network(n))


def order_key_constants(dtype: np.dtype[np.floating]) -> NDArray[np.signedinteger]:
    """(sign shift, magnitude mask, exponent mask) in the int type as wide as float dtype."""
    if dtype == np.float64:
        return np.array([63, (1 << 63) - 1, 0x7FF << 52], dtype=np.int64)
    return np.array([31, (1 << 31) - 1, 0xFF << 23], dtype=np.int32)


def as_bits(slab: NDArray[np.floating]) -> NDArray[np.signedinteger]:
    """The slab's memory viewed as int32 (float32) or int64 (float64)."""
    return slab.view(np.int64 if slab.dtype == np.float64 else np.int32)


@njit(cache=True, nogil=True, inline="always")
def order_key(b, magnitude, zero):  # type: ignore[no-untyped-def]
    """Signed-integer order key of IEEE float bits b: b if b >= 0 else b ^ magnitude."""
    return b ^ (magnitude if b < zero else zero)


@njit(cache=True, nogil=True)
def load_keys(bits, rows, start, count, buffer, key):  # type: ignore[no-untyped-def]
    """buffer[j, l] = order key of slab[rows[j], start + l], for l < count; 0 beyond.

    bits: the slab viewed as int32/int64; key: (sign shift, magnitude mask, exponent
    mask) in that integer type. For IEEE floats the key (flip the magnitude bits of
    negative numbers) is a signed integer in the same order as the float (for non-NaN
    values; -0 < +0), so the network can use integer min/max, one instruction each.
    Rows are read four at a time: four concurrent streams keep more cache misses in
    flight than one (about 2x the bandwidth here). Returns True when a loaded value has
    an all-ones exponent (NaN or Inf): then max(b & magnitude) >= exponent mask.
    """
    magnitude, exponent = key[1], key[2]
    zero = magnitude - magnitude
    top = zero
    m = rows.size
    j = 0
    while j + 4 <= m:
        r0, r1, r2, r3 = rows[j], rows[j + 1], rows[j + 2], rows[j + 3]
        for c in range(count):
            b0 = bits[r0, start + c]
            b1 = bits[r1, start + c]
            b2 = bits[r2, start + c]
            b3 = bits[r3, start + c]
            top = max(top, max(b0 & magnitude, b1 & magnitude))
            top = max(top, max(b2 & magnitude, b3 & magnitude))
            buffer[j, c] = order_key(b0, magnitude, zero)
            buffer[j + 1, c] = order_key(b1, magnitude, zero)
            buffer[j + 2, c] = order_key(b2, magnitude, zero)
            buffer[j + 3, c] = order_key(b3, magnitude, zero)
        j += 4
    while j < m:
        r0 = rows[j]
        for c in range(count):
            b0 = bits[r0, start + c]
            top = max(top, b0 & magnitude)
            buffer[j, c] = order_key(b0, magnitude, zero)
        j += 1
    for j in range(m):
        for c in range(count, buffer.shape[1]):
            buffer[j, c] = zero
    return top >= exponent


@njit(cache=True, nogil=True)
def apply_network(buffer, offset, first, second):  # type: ignore[no-untyped-def]
    """Compare-exchange buffer rows first[p] <= second[p] on columns offset..offset+LANES."""
    for p in range(first.size):
        low = buffer[first[p], offset : offset + LANES]
        high = buffer[second[p], offset : offset + LANES]
        for lane in range(LANES):
            x = low[lane]
            y = high[lane]
            low[lane] = min(x, y)
            high[lane] = max(x, y)


@njit(cache=True, nogil=True)
def keys_to_bits(buffer, row, count, key):  # type: ignore[no-untyped-def]
    """In place: buffer[row, :count] from order keys back to float bits (an involution)."""
    magnitude = key[1]
    zero = magnitude - magnitude
    keys = buffer[row, :count]
    for c in range(count):
        keys[c] = order_key(keys[c], magnitude, zero)


@njit(parallel=True, cache=True, nogil=True)
def mean_of_ranks(  # type: ignore[no-untyped-def]
    slab,
    bits,
    key,
    rows,
    first,
    second,
    lo,
    hi,
    out,
    num_threads,
):
    """out[c] = mean(sorted(slab[rows, c])[lo:hi]), summed in float64; returns finiteness.

    slab: (K, d) float32/float64, C-contiguous, and ``bits``, the same memory as int32/int64;
    key: ``order_key_constants(slab.dtype)``; num_threads: how many buffers (tasks) to
    use, normally ``numba.get_num_threads()``; rows: (m,) int64; first/second: a
    network from ``range_network(m, lo, hi)``; out: (d,). Each thread owns one buffer of
    m x BUFFER_STRIDE keys (allocated once, not per chunk), copies ORDER_CHUNK-wide
    blocks of the m rows into it (contiguous reads the hardware prefetcher follows), then
    sorts them LANES columns at a time in L1. Every coordinate is computed the same way
    whichever thread takes it. Returns False when an input was NaN or Inf.
    """
    d = slab.shape[1]
    m = rows.size
    inv = 1.0 / (hi - lo)
    num_chunks = (d + ORDER_CHUNK - 1) // ORDER_CHUNK
    num_tasks = max(1, min(num_chunks, num_threads))
    finite = np.ones(num_tasks, np.bool_)
    for task in prange(num_tasks):
        buffer = np.empty((m, BUFFER_STRIDE), bits.dtype)
        floats = buffer.view(slab.dtype)
        acc = np.empty(ORDER_CHUNK, np.float64)
        for ch in range(task * num_chunks // num_tasks, (task + 1) * num_chunks // num_tasks):
            start = ch * ORDER_CHUNK
            count = min(d, start + ORDER_CHUNK) - start
            if load_keys(bits, rows, start, count, buffer, key):
                finite[task] = False
            for offset in range(0, count, LANES):
                apply_network(buffer, offset, first, second)
            acc[:count] = 0.0
            for j in range(lo, hi):
                keys_to_bits(buffer, j, count, key)
                for c in range(count):
                    acc[c] += floats[j, c]
            for c in range(count):
                out[start + c] = acc[c] * inv
    return finite.all()


def coordinate_mean_of_ranks(
    slab: NDArray[np.floating], rows: NDArray[np.int64], lo: int, hi: int, out: NDArray[np.floating]
) -> bool:
    """Fill ``out`` with the mean of ranks lo..hi-1 of every coordinate; False if NaN/Inf seen."""
    first, second = range_network(int(rows.size), lo, hi)
    key = order_key_constants(slab.dtype)
    threads = numba.get_num_threads()
    return bool(mean_of_ranks(slab, as_bits(slab), key, rows, first, second, lo, hi, out, threads))
