"""Named privacy levels and the (epsilon, delta, clip norm) targets behind them.

Rationale for the targets (per agent, over the whole training run, add/remove-one-agent
adjacency, so an agent's entire data set is the protected unit):

- epsilon. Central DP deployments of federated learning report epsilon in the single
  digits: epsilon around 8 is the weak end where DP-FedAvg still trains production-size
  models with little accuracy loss (McMahan et al., "Learning Differentially Private
  Recurrent Language Models", 2018, arXiv:1710.06963, reports single-digit epsilon at
  delta 1e-9 for about 10^6 users); epsilon 3 is a common middle ground; epsilon 1 is the classic
  "strong" guarantee, where an adversary's odds about any one agent change by at most e.
- delta must be well below 1/N for N protected units, or a mechanism that publishes one
  unit in full would qualify. 1e-5 suits federations up to about 10^4 agents; the high
  level uses 1e-6 so that it also holds for 10^5.
- clip norm is the L2 bound C on one agent's update; noise std is noise_multiplier * C.
  Tighter budgets need larger multipliers, so a smaller C trades clipping bias for less
  noise. These are starting points for `AdaptiveClipper`, which moves C to the median
  update norm (Andrew et al. 2021, arXiv:1905.03871) whatever the model's scale.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class PrivacyLevel(enum.StrEnum):
    """Privacy level chosen for an organisation or a training run."""

    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


@dataclass(frozen=True)
class PrivacyTargets:
    """What a level promises: (epsilon, delta)-DP with updates clipped to L2 norm clip_norm.

    The NONE level has epsilon = inf, delta = 0 and no clipping (`enabled` is False).
    """

    epsilon: float
    delta: float
    clip_norm: float | None

    @property
    def enabled(self) -> bool:
        """Whether this level asks for any differential privacy at all."""
        return math.isfinite(self.epsilon)


_TARGETS: dict[PrivacyLevel, PrivacyTargets] = {
    PrivacyLevel.NONE: PrivacyTargets(epsilon=math.inf, delta=0.0, clip_norm=None),
    PrivacyLevel.LOW: PrivacyTargets(epsilon=8.0, delta=1e-5, clip_norm=2.0),
    PrivacyLevel.MEDIUM: PrivacyTargets(epsilon=3.0, delta=1e-5, clip_norm=1.0),
    PrivacyLevel.HIGH: PrivacyTargets(epsilon=1.0, delta=1e-6, clip_norm=0.5),
}


def privacy_targets(level: PrivacyLevel | str) -> PrivacyTargets:
    """Targets of a privacy level, given as the enum or its name ("none", "low", ...)."""
    try:
        return _TARGETS[PrivacyLevel(level)]
    except ValueError as error:
        names = ", ".join(repr(member.value) for member in PrivacyLevel)
        raise ValueError(f"privacy level must be one of {names}; got {level!r}") from error
