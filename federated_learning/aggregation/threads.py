"""Numba threads for the aggregation kernels: how many, and how they wait.

GNU OpenMP (Numba's default threading layer here) makes idle threads spin at barriers.
When another process holds a core, a spinning thread burns the time slice its partner
needs, and a parallel region runs 5-10x slower: the median of 69 x 1M float32 took
0.47 s with spinning threads and 0.05 s with passive ones, on the 2-core dev machine with
one core busy. So this package asks for passive waiting before Numba starts its thread
pool; an OMP_WAIT_POLICY set by the operator wins.
"""

from __future__ import annotations

import logging
import os

import numba
import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

logger = logging.getLogger(__name__)


def configure_threads(n: int) -> int:
    """Use ``n`` Numba threads (at most the pool size, NUMBA_NUM_THREADS); return the count set."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"thread count must be an int >= 1; got {n!r}")  # noqa: TRY004
    if n < 1:
        raise ValueError(f"thread count must be >= 1; got {n}")
    available = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    if n > available:
        logger.warning(
            "asked for %s numba threads; only %s available (NUMBA_NUM_THREADS), using %s",
            n,
            available,
            available,
        )
        n = available
    numba.set_num_threads(int(n))
    return int(n)
