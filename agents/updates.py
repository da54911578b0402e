"""An agent's trained update: what the runtime uploads, or holds for masking in a secure round."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class TrainedUpdate:
    """The encoded update of one train task and the figures its notice reports."""

    blob: bytes
    num_examples: int
    dense_bytes: int
    loss: float
    accuracy: float
    seconds: float
    delta: NDArray[np.floating] | None = None
    """Secure rounds: the flattened delta, held until it is masked (``blob`` is then empty)."""
    unclipped: bool | None = None
    """Whether the update was within the clip norm before clipping (None: no clip norm)."""
