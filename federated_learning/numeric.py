"""Numba checks shared by the aggregation kernels and the privacy (quantization) kernels."""

from __future__ import annotations

from numba import njit

# Only reassociation: x * 0 must stay NaN for NaN/Inf x, so no nnan/ninf/nsz flags.
REASSOCIATE = {"reassoc"}


@njit(cache=True, nogil=True, fastmath=REASSOCIATE)
def all_finite(values):  # type: ignore[no-untyped-def]
    """True when no entry of a non-empty 1-D float array is NaN or Inf.

    Serial on purpose: it reads O(d) values (1/K of an aggregation's input), and a
    parallel region costs a scheduler time slice when another process holds a core.
    x * 0 is 0 for finite x and NaN otherwise, so one vectorised sum tests every entry; the zero
    is ``values[0] - values[0]``, of the array's own dtype (float32 lanes stay float32), and NaN
    when that first entry is not finite, which makes the answer False as it should be.
    """
    zero = values[0] - values[0]
    probe = zero
    for c in range(values.size):
        probe += values[c] * zero
    return probe == 0
