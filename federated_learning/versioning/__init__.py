"""Pure versioning logic: rollback policy, version comparison, checkpoint retention. No I/O."""

from .compare import LayerDifference, VersionComparison, compare_versions
from .retention import versions_to_delete
from .rollback import (
    RollbackConfig,
    RollbackDecision,
    RollbackPolicy,
    VersionScore,
    federated_accuracy,
    judge,
)

__all__ = [
    "LayerDifference",
    "RollbackConfig",
    "RollbackDecision",
    "RollbackPolicy",
    "VersionComparison",
    "VersionScore",
    "compare_versions",
    "federated_accuracy",
    "judge",
    "versions_to_delete",
]
