"""How a service process's C allocator hands back memory (glibc only).

The aggregator allocates and frees a few hundred MB every round: each update blob it reads (1-4 MB
for a 1M-parameter model) and each expanded quantized update. glibc serves blocks above its mmap
threshold (128 KiB at first, raised as large blocks are freed, but not for threads' arenas in
time) with fresh pages from the kernel and returns them on free, so every round pays page faults
and munmaps again: 0.38 -> 0.22 CPU-s per round in the aggregator at 69 q8 updates of 1M values
when freed memory is kept instead (docs/performance.md, "The aggregator keeps freed memory"), at
the cost of the process holding on to its largest round's memory.

It also keeps one malloc arena for all threads: glibc gives each thread that allocates an arena
of its own (up to 8 per core), and memory freed in one is not reused by another, so the
aggregator's reader and job threads each held their own round's worth (peak RSS at 69 q8 updates
of 1M values 643-694 MB with an arena per thread, 400-401 MB with one). Its threads allocate a few
large blocks per update, so they hardly ever wait for the arena's lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
LARGEST_HEAP_BLOCK = 32 << 20
"""Blocks up to this size come from the heap (glibc's largest allowed mmap threshold on 64-bit)."""
KEPT_FREE_BYTES = 512 << 20
"""Freed memory the heap keeps before it gives the top back to the kernel."""


def retain_freed_memory(largest_heap_block: int = LARGEST_HEAP_BLOCK, kept_free: int = KEPT_FREE_BYTES,
                        arenas: int = 1) -> bool:
    """Serve blocks up to ``largest_heap_block`` from the heap, keep up to ``kept_free`` freed
    bytes for reuse and share ``arenas`` malloc arenas among all threads; True when the C library
    took every setting (False elsewhere than glibc). Call it before the process starts threads."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    taken = all([mallopt(M_MMAP_THRESHOLD, largest_heap_block) == 1, mallopt(M_TRIM_THRESHOLD, kept_free) == 1,
                 mallopt(M_ARENA_MAX, arenas) == 1])
    log.info("freed memory kept for reuse (blocks up to %d MiB from the heap, %d arena(s)): %s",
             largest_heap_block >> 20, arenas, "yes" if taken else "not supported here")
    return taken
