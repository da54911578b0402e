"""How a service process's C allocator hands back memory (glibc only).

The aggregator allocates and frees a few hundred MB every round: each update blob it reads (1-4 MB
for a 1M-parameter model) and each expanded quantized update. glibc serves blocks above its mmap
threshold (128 KiB at first, raised as large blocks are freed, but not for threads' arenas in
time) with fresh pages from the kernel and returns them on free, so every round pays page faults
and munmaps again: 0.38 -> 0.22 CPU-s per round in the aggregator at 69 q8 updates of 1M values
when freed memory is kept instead (docs/performance.md, "The aggregator keeps freed memory"), at
the cost of the process holding on to its largest round's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST_HEAP_BLOCK = 32 << 20
"""Blocks up to this size come from the heap (glibc's largest allowed mmap threshold on 64-bit)."""
KEPT_FREE_BYTES = 512 << 20
"""Freed memory the heap keeps before it gives the top back to the kernel."""


def retain_freed_memory(largest_heap_block: int = LARGEST_HEAP_BLOCK, kept_free: int = KEPT_FREE_BYTES) -> bool:
    """Serve blocks up to ``largest_heap_block`` from the heap and keep up to ``kept_free`` freed
    bytes for reuse; True when the C library took both settings (False elsewhere than glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    taken = bool(mallopt(M_MMAP_THRESHOLD, largest_heap_block) == 1 and mallopt(M_TRIM_THRESHOLD, kept_free) == 1)
    log.info("freed memory kept for reuse (blocks up to %d MiB from the heap): %s", largest_heap_block >> 20,
             "yes" if taken else "not supported here")
    return taken
