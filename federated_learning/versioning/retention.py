"""Which checkpoints to delete: keep the newest, the best, the initial and the protected.

A version survives when any of these holds:

* it is version 0 (the initial model every lineage starts from);
* it is protected (the current version, rollback targets, anything an operator pinned);
* it is among the ``keep_last`` newest versions;
* it is among the ``keep_best`` highest-scoring versions (newest first on ties; versions
  without a finite score are never "best").

Everything else is returned for deletion, oldest first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from federated_learning.types import ModelVersion

INITIAL_VERSION: ModelVersion = 0


def newest(versions: Iterable[ModelVersion], count: int) -> set[ModelVersion]:
    return set(sorted(versions, reverse=True)[:count])


def best(versions: Iterable[ModelVersion], scores: Mapping[ModelVersion, float],
         count: int) -> set[ModelVersion]:
    """The ``count`` versions with the highest finite score, newest first on ties."""
    scored = [v for v in versions if v in scores and math.isfinite(scores[v])]
    return set(sorted(scored, key=lambda v: (scores[v], v), reverse=True)[:count])


def versions_to_delete(versions: list[ModelVersion], scores: Mapping[ModelVersion, float],
                       keep_last: int, keep_best: int,
                       protected: set[ModelVersion]) -> list[ModelVersion]:
    """Versions whose checkpoints may go, in increasing order."""
    if keep_last < 0 or keep_best < 0:
        raise ValueError(f"keep_last and keep_best must be >= 0; got {keep_last} and {keep_best}")
    unique = set(versions)
    kept = {INITIAL_VERSION} | protected | newest(unique, keep_last) | best(unique, scores, keep_best)
    return sorted(unique - kept)
