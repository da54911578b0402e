"""Automatic rollback: when the global model keeps getting worse, go back to a good version.

Seed 004's ``RollbackConfig`` names. A version is *degraded* when its accuracy is below

    best_so_far * (1 - performance_threshold)

where ``best_so_far`` is the highest accuracy of any earlier version. The threshold is
relative, not absolute, because accuracies sit at very different levels across tasks: an
absolute drop of 0.05 is a sixth of everything a hard task at 0.30 has learnt but a small
wobble for an easy task at 0.98. A relative threshold asks the same of every task: lose no
more than this fraction of the best accuracy reached.

After ``consecutive_degradations`` degraded versions in a row at the end of the history, the
policy decides a rollback: to the best version, or (``rollback_to_best=False``) to the last
non-degraded version before the streak. With the default of 3, one noisy evaluation
never triggers it.

Version v's federated accuracy is known from the reports of round v+1 (agents evaluate each
global model they receive on held-out data; :func:`federated_accuracy`). When the server
also validates a version on its own held-out set, ``VersionScore.server_accuracy`` takes
precedence: it is one fixed data set, so it is comparable across versions, whereas the
federated figure depends on which agents happened to report. Supply it for all versions or
for none; mixing the two compares different data sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from pydantic import BaseModel, ConfigDict, field_validator

from federated_learning.types import ModelVersion


class RollbackConfig(BaseModel):
    """When the version manager rolls back on its own (seed 004's names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    performance_threshold: float = 0.05
    """Relative drop from the best accuracy that counts as degraded, in (0, 1)."""
    consecutive_degradations: int = 3
    rollback_to_best: bool = True
    """True: go back to the best version; False: to the last good version before the streak."""

    @field_validator("performance_threshold")
    @classmethod
    def _threshold_in_open_unit_interval(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"performance_threshold must be in (0, 1); got {value}")
        return value

    @field_validator("consecutive_degradations")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"consecutive_degradations must be >= 1; got {value}")
        return value


@dataclass(frozen=True)
class VersionScore:
    """How one version scored; ``server_accuracy``, when known, wins over ``accuracy``."""

    version: ModelVersion
    accuracy: float
    """Federated accuracy: example-weighted mean of the agents' held-out accuracy."""
    loss: float | None = None
    """Carried for reports; the policy judges on accuracy only."""
    server_accuracy: float | None = None

    @property
    def score(self) -> float:
        """The accuracy the policy judges: server-side when present, else federated."""
        return self.accuracy if self.server_accuracy is None else self.server_accuracy

    @property
    def source(self) -> str:
        return "federated" if self.server_accuracy is None else "server"


@dataclass(frozen=True)
class RollbackDecision:
    target_version: ModelVersion
    reason: str
    degraded_versions: list[ModelVersion]


def federated_accuracy(accuracies: Sequence[float], num_examples: Sequence[int]) -> float:
    """Example-weighted mean accuracy: sum_k n_k * acc_k / sum_k n_k."""
    if len(accuracies) != len(num_examples):
        raise ValueError(f"got {len(accuracies)} accuracies for {len(num_examples)} example counts")
    if any(n < 0 for n in num_examples):
        raise ValueError(f"example counts must be >= 0; got {list(num_examples)}")
    total = sum(num_examples)
    if total == 0:
        raise ValueError("federated accuracy needs at least one evaluated example; got 0")
    return math.fsum(a * n for a, n in zip(accuracies, num_examples, strict=True)) / total


def degradation_floor(best: float, threshold: float) -> float:
    """Accuracy below which a version is degraded: best * (1 - threshold)."""
    return best * (1.0 - threshold)


def is_degraded(score: float, best: float, threshold: float) -> bool:
    return score < degradation_floor(best, threshold)


def _check_history(history: Sequence[VersionScore]) -> None:
    for previous, current in pairwise(history):
        if current.version <= previous.version:
            raise ValueError(f"history must be in increasing version order; "
                             f"version {current.version} follows {previous.version}")
    for item in history:
        if not math.isfinite(item.score):
            raise ValueError(f"version {item.version} has a non-finite accuracy {item.score}")


def best_index(history: Sequence[VersionScore]) -> int:
    """Index of the highest-scoring version; the newest one on ties."""
    return max(range(len(history)), key=lambda i: (history[i].score, i))


def trailing_streak(history: Sequence[VersionScore], best: int, threshold: float,
                    last_rollback_at_version: ModelVersion | None) -> list[int]:
    """Indices of the degraded versions at the end of ``history``, after the best one and
    after ``last_rollback_at_version``."""
    floor_version = last_rollback_at_version if last_rollback_at_version is not None else -1
    best_score = history[best].score
    streak: list[int] = []
    for i in range(len(history) - 1, best, -1):
        item = history[i]
        if item.version <= floor_version or not is_degraded(item.score, best_score, threshold):
            break
        streak.append(i)
    return streak[::-1]


def last_good_before(history: Sequence[VersionScore], start: int, best: int, threshold: float) -> int:
    """Index of the newest non-degraded version before ``start``; the best one at the latest."""
    best_score = history[best].score
    for i in range(start - 1, best, -1):
        if not is_degraded(history[i].score, best_score, threshold):
            return i
    return best


def _reason(history: Sequence[VersionScore], streak: list[int], best: int, target: int,
            threshold: float) -> str:
    scores = ", ".join(f"{history[i].score:.4f}" for i in streak)
    versions = ", ".join(str(history[i].version) for i in streak)
    best_item, target_item = history[best], history[target]
    why = (f"versions {versions} scored {scores} ({best_item.source} accuracy), each more than "
           f"{threshold:.1%} below the best {best_item.score:.4f} of version {best_item.version}, "
           f"{len(streak)} times in a row")
    if target == best:
        return f"{why}; rolling back to the best version {best_item.version}"
    return (f"{why}; rolling back to version {target_item.version} ({target_item.score:.4f}), "
            "the last version before the streak within the threshold")


def judge(history: Sequence[VersionScore], config: RollbackConfig,
          last_rollback_at_version: ModelVersion | None = None) -> RollbackDecision | None:
    """The rollback to make now, or None.

    Args:
        history: every scored version, in increasing version order.
        config: the training's rollback policy.
        last_rollback_at_version: the newest version already judged when the previous
            rollback was decided; versions up to it never count towards a new streak, so
            one streak yields one decision.
    """
    if not config.enabled or not history:
        return None
    _check_history(history)
    best = best_index(history)
    threshold = config.performance_threshold
    streak = trailing_streak(history, best, threshold, last_rollback_at_version)
    if len(streak) < config.consecutive_degradations:
        return None
    target = best if config.rollback_to_best else last_good_before(history, streak[0], best, threshold)
    return RollbackDecision(
        target_version=history[target].version,
        reason=_reason(history, streak, best, target, threshold),
        degraded_versions=[history[i].version for i in streak],
    )


@dataclass(frozen=True)
class RollbackPolicy:
    """A training's rollback policy bound to its config; see :func:`judge`."""

    config: RollbackConfig

    def judge(self, history: Sequence[VersionScore],
              last_rollback_at_version: ModelVersion | None = None) -> RollbackDecision | None:
        return judge(history, self.config, last_rollback_at_version)
