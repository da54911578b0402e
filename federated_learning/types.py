"""The project's vocabulary, named once."""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

AgentId: TypeAlias = str
TrainingId: TypeAlias = str
RoundNumber: TypeAlias = int
ModelVersion: TypeAlias = int
BlobDigest: TypeAlias = str
"""Lower-case hex SHA-256 of a blob's bytes."""

Weights: TypeAlias = NDArray[np.float32]
NamedLayers: TypeAlias = dict[str, NDArray[np.floating]]
"""A model as named tensors, in a fixed (insertion) order."""
