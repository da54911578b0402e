"""Exact greedy k-center (Gonzalez 1985) with triangle-inequality pruning, in Numba.

Gonzalez, "Clustering to minimize the maximum intercluster distance", Theoretical Computer
Science 38, 1985: pick a row, then repeatedly the row farthest from all picks so far.
Brute force costs k x N x d. Here every unpicked row belongs to the cluster of its nearest
pick, and each cluster j keeps its radius r_j (largest distance to its center c_j). When
a new center c arrives, a row x of cluster j can only move to c if
d(x, c) < d(x, c_j), and since d(x, c) >= d(c, c_j) - d(x, c_j) that needs
d(c, c_j) < 2 d(x, c_j) <= 2 r_j (Elkan, "Using the triangle inequality to accelerate
k-means", ICML 2003, Lemma 1). So whole clusters with d(c, c_j) >= 2 r_j are skipped, and
within the others every row with d(c, c_j) >= 2 d(x, c_j) is skipped without reading it.
The next pick is the row with the largest radius over all clusters. The picks are those of
brute force, up to ties and float32 rounding of near-equal distances.

Rows whose owner has used up its quota are dropped from every cluster (they can never be
picked again, and the picks they already made stay centers).

Storage: the projected rows themselves (float32), their row numbers and their squared
distances live in one position buffer of 2N rows, each cluster a contiguous segment, so a
rescan reads memory sequentially (a gather by row number ran 4x slower); a row that
moves is copied to its new cluster's segment at the end of the buffer, and the buffer is
compacted in place when it runs out of room: memory 2N x d floats, never N x N.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

CHUNK_ROWS = 2048
"""Rows per parallel work item when rescanning clusters: balances the threads when one
cluster holds most rows (early picks) without a task per row."""
PARALLEL_MIN_ROWS = 32768
"""Below this many candidate rows a rescan runs on one thread: waking the pool costs more."""
PRUNE_SLACK = np.float32(0.2499)
"""A row is rescanned when its squared distance exceeds d(c, c_j)^2 x PRUNE_SLACK: 1/4 from
the triangle inequality (squared), a hair below it so float32 rounding never skips a row
that could move."""


@njit(cache=True, nogil=True, fastmath=True)
def sq_distance(a, i, b, j):  # type: ignore[no-untyped-def]
    """||a[i] - b[j]||^2 in float32; a, b 2-D float32 of one width."""
    total = np.float32(0.0)
    for c in range(a.shape[1]):
        t = a[i, c] - b[j, c]
        total += t * t
    return total


@njit(cache=True, nogil=True)
def copy_position(vec, rows, memd, src, dst):  # type: ignore[no-untyped-def]
    """Position ``src`` (vector, row number, squared distance) copied to ``dst``."""
    vec[dst, :] = vec[src, :]
    rows[dst] = rows[src]
    memd[dst] = memd[src]


@njit(cache=True, nogil=True)
def swap_positions(vec, rows, memd, moved, a, b):  # type: ignore[no-untyped-def]
    """Exchange positions a and b."""
    for c in range(vec.shape[1]):
        vec[a, c], vec[b, c] = vec[b, c], vec[a, c]
    rows[a], rows[b] = rows[b], rows[a]
    memd[a], memd[b] = memd[b], memd[a]
    moved[a], moved[b] = moved[b], moved[a]


@njit(cache=True, nogil=True)
def rescan_chunk(vec, memd, moved, start, stop, centers, c, threshold):  # type: ignore[no-untyped-def]
    """For positions [start, stop): a row farther than ``threshold`` (squared) from its own
    center is measured against centers[c]; if nearer, its squared distance is replaced and
    moved[pos] = 1, else moved[pos] = 0."""
    for pos in range(start, stop):
        moved[pos] = 0
        if memd[pos] > threshold:
            d = sq_distance(vec, pos, centers, c)
            if d < memd[pos]:
                memd[pos] = d
                moved[pos] = 1


@njit(cache=True, nogil=True)
def rescan_chunks(vec, memd, moved, chunks, thresholds, centers, c):  # type: ignore[no-untyped-def]
    """rescan_chunk over every (start, stop, cluster) row of ``chunks``, one thread."""
    for i in range(chunks.shape[0]):
        rescan_chunk(vec, memd, moved, chunks[i, 0], chunks[i, 1], centers, c,
                     thresholds[chunks[i, 2]])


@njit(parallel=True, cache=True, nogil=True)
def rescan_chunks_parallel(vec, memd, moved, chunks, thresholds, centers, c):  # type: ignore[no-untyped-def]
    """rescan_chunk over every (start, stop, cluster) row of ``chunks``, Numba-parallel."""
    for i in prange(chunks.shape[0]):
        rescan_chunk(vec, memd, moved, chunks[i, 0], chunks[i, 1], centers, c,
                     thresholds[chunks[i, 2]])


@njit(cache=True, nogil=True)
def partition_segment(vec, rows, memd, moved, start, stop):  # type: ignore[no-untyped-def]
    """Reorder [start, stop) so the rows staying come first; return (their end, the position
    of the largest squared distance among them or -1)."""
    end = stop
    i = start
    best = -1
    best_value = np.float32(-1.0)
    while i < end:
        if moved[i]:
            end -= 1
            swap_positions(vec, rows, memd, moved, i, end)
        else:
            if memd[i] > best_value:
                best_value = memd[i]
                best = i
            i += 1
    return end, best


@njit(cache=True, nogil=True)
def farthest_in_segment(memd, start, stop):  # type: ignore[no-untyped-def]
    """Position of the largest squared distance in [start, stop); -1 when empty."""
    best = -1
    best_value = np.float32(-1.0)
    for pos in range(start, stop):
        if memd[pos] > best_value:
            best_value = memd[pos]
            best = pos
    return best


@njit(cache=True, nogil=True)
def drop_owner(vec, rows, memd, owners, seg_start, seg_end, far, count, owner):  # type: ignore[no-untyped-def]
    """Remove every row of ``owner`` from clusters 0..count-1; recompute their farthest rows."""
    for j in range(count):
        write = seg_start[j]
        for pos in range(seg_start[j], seg_end[j]):
            if owners[rows[pos]] != owner:
                if write != pos:
                    copy_position(vec, rows, memd, pos, write)
                write += 1
        seg_end[j] = write
        far[j] = farthest_in_segment(memd, seg_start[j], write)


@njit(cache=True, nogil=True)
def compact(vec, rows, memd, seg_start, seg_end, far, count):  # type: ignore[no-untyped-def]
    """Slide the segments of clusters 0..count-1 down, in position order, so they lie back to
    back from position 0 (each copy goes to a lower position, so in place is safe); return
    the first free position."""
    top = 0
    for j in np.argsort(seg_start[:count]):
        length = seg_end[j] - seg_start[j]
        if seg_start[j] != top:
            for i in range(length):
                copy_position(vec, rows, memd, seg_start[j] + i, top + i)
        if far[j] >= 0:
            far[j] = far[j] - seg_start[j] + top
        seg_start[j] = top
        seg_end[j] = top + length
        top += length
    return top


@njit(cache=True, nogil=True)
def collect_chunks(seg_start, seg_end, scan, num_scan, chunks):  # type: ignore[no-untyped-def]
    """Fill ``chunks`` with (start, stop, cluster) pieces of at most CHUNK_ROWS rows covering
    the clusters scan[:num_scan]; return the number of chunks."""
    n = 0
    for s in range(num_scan):
        j = scan[s]
        for a in range(seg_start[j], seg_end[j], CHUNK_ROWS):
            chunks[n, 0] = a
            chunks[n, 1] = min(a + CHUNK_ROWS, seg_end[j])
            chunks[n, 2] = j
            n += 1
    return n


@njit(cache=True, nogil=True)
def first_cluster(vec, rows, memd, n, first, owners, remaining, centers):  # type: ignore[no-untyped-def]
    """Center 0 is row ``first``; every other eligible row of vec[:n] joins its cluster,
    packed from position 0. Return the end of the cluster."""
    centers[0, :] = vec[first, :]
    top = 0
    for row in range(n):
        if row != first and remaining[owners[row]] > 0:
            if top != row:
                vec[top, :] = vec[row, :]
            rows[top] = row
            top += 1
    return top


@njit(cache=True, nogil=True)
def greedy_k_center_pruned(vec, n, first, k, owners, remaining, picks):  # type: ignore[no-untyped-def]
    """Greedy k-center over the float32 rows vec[:n] (d wide) from row ``first``; return the
    number of picks.

    vec must have at least 2n + CHUNK_ROWS rows and is overwritten (it becomes the position
    buffer). picks (k,) int64 receives the row numbers in pick order. A row is eligible
    while remaining[owners[row]] > 0 (int64 arrays; ``remaining`` is used up in place).
    """
    cap = vec.shape[0]
    rows = np.empty(cap, np.int64)
    memd = np.empty(cap, np.float32)
    moved = np.zeros(cap, np.uint8)
    seg_start = np.zeros(k, np.int64)
    seg_end = np.zeros(k, np.int64)
    far = np.full(k, -1, np.int64)
    centers = np.empty((k, vec.shape[1]), np.float32)
    center_sq = np.empty(k, np.float32)
    thresholds = np.empty(k, np.float32)
    scan = np.empty(k, np.int64)
    old_end = np.empty(k, np.int64)
    chunks = np.empty((n // CHUNK_ROWS + k + 1, 3), np.int64)

    picks[0] = first
    remaining[owners[first]] -= 1
    top = first_cluster(vec, rows, memd, n, first, owners, remaining, centers)
    seg_end[0] = top
    memd[:top] = np.inf
    num_chunks = collect_chunks(seg_start, seg_end, np.zeros(1, np.int64), 1, chunks)
    thresholds[0] = np.float32(-1.0)
    if top >= PARALLEL_MIN_ROWS:
        rescan_chunks_parallel(vec, memd, moved, chunks[:num_chunks], thresholds, centers, 0)
    else:
        rescan_chunks(vec, memd, moved, chunks[:num_chunks], thresholds, centers, 0)
    far[0] = farthest_in_segment(memd, 0, top)

    count = 1
    while count < k:
        best = -1
        best_value = np.float32(-1.0)
        for j in range(count):
            if far[j] >= 0 and memd[far[j]] > best_value:
                best_value = memd[far[j]]
                best = j
        if best < 0:
            break
        pos = far[best]
        picks[count] = rows[pos]
        centers[count, :] = vec[pos, :]
        seg_end[best] -= 1
        copy_position(vec, rows, memd, seg_end[best], pos)
        owner = owners[picks[count]]
        remaining[owner] -= 1
        if remaining[owner] == 0:
            drop_owner(vec, rows, memd, owners, seg_start, seg_end, far, count, owner)
        far[best] = farthest_in_segment(memd, seg_start[best], seg_end[best])

        num_scan = 0
        candidates = 0
        for j in range(count):
            if far[j] >= 0:
                center_sq[j] = sq_distance(centers, j, centers, count)
                if center_sq[j] * PRUNE_SLACK < memd[far[j]]:
                    scan[num_scan] = j
                    thresholds[j] = center_sq[j] * PRUNE_SLACK
                    num_scan += 1
                    candidates += seg_end[j] - seg_start[j]
        if top + candidates > cap:
            top = compact(vec, rows, memd, seg_start, seg_end, far, count)
        num_chunks = collect_chunks(seg_start, seg_end, scan, num_scan, chunks)
        if candidates >= PARALLEL_MIN_ROWS:
            rescan_chunks_parallel(vec, memd, moved, chunks[:num_chunks], thresholds, centers,
                                   count)
        else:
            rescan_chunks(vec, memd, moved, chunks[:num_chunks], thresholds, centers, count)

        for s in range(num_scan):
            j = scan[s]
            old_end[s] = seg_end[j]
            seg_end[j], far[j] = partition_segment(vec, rows, memd, moved, seg_start[j],
                                                   seg_end[j])
        seg_start[count] = top
        for s in range(num_scan):
            j = scan[s]
            for src in range(seg_end[j], old_end[s]):
                copy_position(vec, rows, memd, src, top)
                top += 1
        seg_end[count] = top
        far[count] = farthest_in_segment(memd, seg_start[count], top)
        count += 1
    return count
