"""Numba thread count for the aggregation kernels."""

from __future__ import annotations

import logging

import numba
import numpy as np

logger = logging.getLogger(__name__)


def configure_threads(n: int) -> int:
    """Use ``n`` Numba threads (at most the pool size, NUMBA_NUM_THREADS); return the count set."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"thread count must be an int >= 1; got {n!r}")
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
