"""Coordinate-wise order statistics of K updates: sorting networks vectorised across coordinates.

For every coordinate c, the K values x_1[c], ..., x_K[c] go through a fixed sequence
of compare-exchange operations (Batcher's odd-even merge sort, Batcher 1968, "Sorting
networks and their applications", pruned to what the caller needs). Running the same
network on LANES neighbouring coordinates at once turns each compare-exchange into one
vector min and one vector max, with no data-dependent branches, and never a K x d copy.

Scratch lives in the output: the kernels write ``out`` block by block, so until the end
of a call its last part is free. ``coordinate_reduce`` carves one workspace per thread
from the end of ``out`` (a (K, BUFFER_STRIDE) key buffer and a float64 row), computes
everything before them in wide blocks, then does the same for the workspaces' own span
with LANES-wide blocks and much smaller workspaces, and computes the last few thousand
coordinates serially in one (K, LANES) tile, the only memory allocated beyond ``out``.
Which block a coordinate falls in never changes how it is computed, so results do not
depend on the thread count.

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


MEAN_OF_RANKS = 0
NEAR_MEDIAN = 1
# float64 words of a workspace besides its keys: a block's sums, or Bulyan's per-lane
# (middle, best cost, best start) triple.
NEAR_MEDIAN_WORDS = 3 * LANES


@njit(cache=True, nogil=True)
def sum_ranks(floats, count, lo, hi, acc, out, start):  # type: ignore[no-untyped-def]
    """out[start + c] = mean of floats[lo:hi, c], summed in float64 over ranks in order."""
    acc[:count] = 0.0
    for j in range(lo, hi):
        for c in range(count):
            acc[c] += floats[j, c]
    inv = 1.0 / (hi - lo)
    for c in range(count):
        out[start + c] = acc[c] * inv


@njit(cache=True, nogil=True)
def near_median_means(floats, count, beta, scratch, out, start):  # type: ignore[no-untyped-def]
    """out[start + c] = mean of the beta sorted floats[:, c] nearest their median.

    floats: (theta, >= count rounded up to LANES) sorted column-wise; scratch: float64,
    >= NEAR_MEDIAN_WORDS. In sorted order the beta nearest values form a window; the
    window whose farther end is nearest the median wins (the lower one on ties), and its
    values are summed in float64 in rank order.
    """
    theta = floats.shape[0]
    half = theta // 2
    middle = scratch[:LANES]
    best = scratch[LANES : 2 * LANES]
    best_start = scratch[2 * LANES : 3 * LANES]
    for offset in range(0, count, LANES):
        for lane in range(LANES):
            if theta % 2 == 1:
                middle[lane] = floats[half, offset + lane]
            else:
                low = np.float64(floats[half - 1, offset + lane])
                middle[lane] = 0.5 * (low + floats[half, offset + lane])
            best[lane] = np.inf
            best_start[lane] = 0.0
        for s in range(theta - beta + 1):
            for lane in range(LANES):
                low_gap = middle[lane] - floats[s, offset + lane]
                high_gap = floats[s + beta - 1, offset + lane] - middle[lane]
                cost = max(low_gap, high_gap)
                if cost < best[lane]:
                    best[lane] = cost
                    best_start[lane] = s
        for lane in range(min(LANES, count - offset)):
            first_rank = int(best_start[lane])
            total = 0.0
            for j in range(first_rank, first_rank + beta):
                total += floats[j, offset + lane]
            out[start + offset + lane] = total / beta


@njit(cache=True, nogil=True)
def reduce_block(  # type: ignore[no-untyped-def]
    mode, bits, key, rows, first, second, lo, hi, start, count, keys, floats, scratch, out
):
    """One block of ``count`` coordinates from ``start``: load, sort, reduce into out.

    keys/floats: the same (m, stride) buffer as ints and floats, stride >= count rounded
    up to LANES; scratch: float64 words. mode MEAN_OF_RANKS averages ranks lo..hi-1;
    NEAR_MEDIAN averages the lo values nearest the median (a full sorting network).
    Returns True when an input was NaN or Inf.
    """
    seen = load_keys(bits, rows, start, count, keys, key)
    for offset in range(0, count, LANES):
        apply_network(keys, offset, first, second)
    if mode == MEAN_OF_RANKS:
        for j in range(lo, hi):
            keys_to_bits(keys, j, count, key)
        sum_ranks(floats, count, lo, hi, scratch, out, start)
    else:
        for j in range(keys.shape[0]):
            keys_to_bits(keys, j, count, key)
        near_median_means(floats, count, lo, scratch, out, start)
    return seen


@njit(cache=True, nogil=True)
def reduce_span(  # type: ignore[no-untyped-def]
    mode, bits, key, rows, first, second, lo, hi, start, stop, width, keys, scratch, out
):
    """Blocks of ``width`` coordinates over [start, stop), one workspace; True on NaN/Inf."""
    floats = keys.view(out.dtype)
    seen = False
    for block in range(start, stop, width):
        count = min(stop, block + width) - block
        seen |= reduce_block(
            mode, bits, key, rows, first, second, lo, hi, block, count, keys, floats, scratch, out
        )
    return seen


@njit(parallel=True, cache=True, nogil=True)
def reduce_in_place(  # type: ignore[no-untyped-def]
    mode,
    bits,
    key,
    rows,
    first,
    second,
    lo,
    hi,
    out,
    out_bits,
    start,
    stop,
    width,
    stride,
    slot,
    num_tasks,
):
    """Compute out[start:stop]; task t's workspace is out[stop + t slot : stop + (t+1) slot].

    out_bits is out's memory as int32/int64; slot: from ``slot_size``, with stop and slot
    multiples of 8 bytes. Tasks take contiguous runs of width-wide blocks. Returns True
    when an input was NaN or Inf.
    """
    m = rows.size
    key_words = m * stride
    num_blocks = (stop - start + width - 1) // width
    seen = np.zeros(num_tasks, np.bool_)
    for task in prange(num_tasks):
        base = stop + task * slot
        keys = out_bits[base : base + key_words].reshape((m, stride))
        scratch = out[base + key_words : base + slot].view(np.float64)
        first_block = task * num_blocks // num_tasks
        last_block = (task + 1) * num_blocks // num_tasks
        span_start = start + first_block * width
        span_stop = min(stop, start + last_block * width)
        if span_start < span_stop:
            seen[task] = reduce_span(
                mode,
                bits,
                key,
                rows,
                first,
                second,
                lo,
                hi,
                span_start,
                span_stop,
                width,
                keys,
                scratch,
                out,
            )
    return seen.any()


PAGE_BYTES = 4096
# Page offset of every workspace. The key buffers must be cache-line aligned: at 16 bytes
# past a line (where NumPy's large arrays start) every 256-byte row segment of the
# network's vector min/max splits lines, and the sort took 0.59 s instead of 0.44 s per
# 5M coordinates on one thread.
SLOT_PAGE_OFFSET = 0


def slot_size(num_rows: int, stride: int, width: int, itemsize: int) -> int:
    """Elements of out one workspace takes: (num_rows, stride) keys, then float64 words.

    Rounded up to whole pages, so that every workspace has the same page offset.
    """
    words = max(width, NEAR_MEDIAN_WORDS)
    size_bytes = (num_rows * stride + words * 8 // itemsize) * itemsize
    return -(-size_bytes // PAGE_BYTES) * PAGE_BYTES // itemsize


def workspace_start(out: NDArray[np.floating], latest: int) -> int:
    """The largest index <= latest of out whose address is SLOT_PAGE_OFFSET past a page.

    Needs out to be itemsize-aligned (NumPy arrays are).
    """
    address = out.ctypes.data + latest * out.itemsize
    return latest - (address - SLOT_PAGE_OFFSET) % PAGE_BYTES // out.itemsize


# (block width, key-buffer row stride) of the in-place phases, widest first.
PHASES = ((ORDER_CHUNK, BUFFER_STRIDE), (LANES, LANES))


def coordinate_reduce(
    slab: NDArray[np.floating],
    rows: NDArray[np.int64],
    network: tuple[NDArray[np.int64], NDArray[np.int64]],
    mode: int,
    lo: int,
    hi: int,
    out: NDArray[np.floating],
    num_threads: int,
) -> bool:
    """Run a rank reduction over every coordinate into ``out``; False if NaN/Inf was seen.

    slab: (K, d) float32/float64, C-contiguous; rows: (m,) int64; out: (d,) of slab's
    dtype. Extra memory: one (m, LANES) key tile and 3 * LANES float64 words; the rest of
    the scratch is out's own not-yet-written tail (see the module docstring).
    """
    first, second = network
    key = order_key_constants(slab.dtype)
    bits, out_bits = as_bits(slab), as_bits(out)
    m, itemsize = int(rows.size), out.itemsize
    seen = False
    start, stop = 0, out.size
    for width, stride in PHASES:
        slot = slot_size(m, stride, width, itemsize)
        region_stop = workspace_start(out, stop - num_threads * slot)
        if region_stop > start:
            seen |= bool(
                reduce_in_place(
                    mode,
                    bits,
                    key,
                    rows,
                    first,
                    second,
                    lo,
                    hi,
                    out,
                    out_bits,
                    start,
                    region_stop,
                    width,
                    stride,
                    slot,
                    num_threads,
                )
            )
            start = region_stop
    keys = np.empty((m, LANES), bits.dtype)
    scratch = np.empty(NEAR_MEDIAN_WORDS, np.float64)
    seen |= bool(
        reduce_span(
            mode, bits, key, rows, first, second, lo, hi, start, stop, LANES, keys, scratch, out
        )
    )
    return not seen


def coordinate_mean_of_ranks(
    slab: NDArray[np.floating], rows: NDArray[np.int64], lo: int, hi: int, out: NDArray[np.floating]
) -> bool:
    """Fill ``out`` with the mean of ranks lo..hi-1 of every coordinate; False if NaN/Inf seen."""
    network = range_network(int(rows.size), lo, hi)
    threads = numba.get_num_threads()
    return coordinate_reduce(slab, rows, network, MEAN_OF_RANKS, lo, hi, out, threads)
