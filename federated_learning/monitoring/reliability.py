"""Agent reliability and contribution scores, and the leaderboard built from them.

Counts per agent (:class:`AgentStats`): ``asked`` tasks were assigned; ``completed`` updates
were delivered, ``late`` of them after the round's deadline; ``dropped`` tasks ended without
an update (timeout, disconnect); the rest are still open. ``flagged`` delivered updates were
marked suspicious by the anomaly statistics. ``contribution`` is the agent's accumulated
aggregation weight (the sum over rounds of its share of the round's examples).

    completion = (completed + 1) / (completed + dropped + 2)
    lateness   = 1 - LATE_PENALTY * late / completed           (1 when completed = 0)
    flags      = 1 - flagged / completed                       (1 when completed = 0)
    reliability = completion * lateness * flags                in [0, 1]

``completion`` is the posterior mean of the success probability under a uniform Beta(1, 1)
prior (Laplace's rule of succession): a new agent starts at 0.5 instead of jumping to 0 or
1 on its first task. Open tasks count neither way. A late update still helps (buffered
rounds use it) but is worth ``1 - LATE_PENALTY`` of an on-time one; a flagged update is
worth nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from federated_learning.types import AgentId

LATE_PENALTY = 0.5
"""Share of an update's worth lost when it arrives after the deadline."""
PRIOR_SUCCESSES = 1
PRIOR_FAILURES = 1


@dataclass(frozen=True)
class AgentStats:
    asked: int
    completed: int
    late: int
    dropped: int
    flagged: int
    examples: int
    contribution: float

    def __post_init__(self) -> None:
        counts = {"asked": self.asked, "completed": self.completed, "late": self.late,
                  "dropped": self.dropped, "flagged": self.flagged, "examples": self.examples}
        negative = {name: value for name, value in counts.items() if value < 0}
        if negative or self.contribution < 0:
            bad = negative or f"contribution={self.contribution}"
            raise ValueError(f"agent stats must be >= 0; got {bad}")
        if self.completed + self.dropped > self.asked:
            raise ValueError(f"completed + dropped must be <= asked; got {self.completed} + "
                             f"{self.dropped} > {self.asked}")
        if self.late > self.completed or self.flagged > self.completed:
            raise ValueError(f"late and flagged must be <= completed; got late={self.late}, "
                             f"flagged={self.flagged}, completed={self.completed}")


def completion_rate(stats: AgentStats) -> float:
    """(completed + 1) / (completed + dropped + 2): Beta(1, 1) posterior mean."""
    trials = stats.completed + stats.dropped + PRIOR_SUCCESSES + PRIOR_FAILURES
    return (stats.completed + PRIOR_SUCCESSES) / trials


def lateness_factor(stats: AgentStats) -> float:
    return 1.0 if stats.completed == 0 else 1.0 - LATE_PENALTY * stats.late / stats.completed


def flag_factor(stats: AgentStats) -> float:
    return 1.0 if stats.completed == 0 else 1.0 - stats.flagged / stats.completed


def reliability_score(stats: AgentStats) -> float:
    """completion * lateness * flags, in [0, 1]; see the module docstring."""
    return completion_rate(stats) * lateness_factor(stats) * flag_factor(stats)


def contribution_score(stats: Mapping[AgentId, AgentStats]) -> dict[AgentId, float]:
    """Each agent's share of the total contribution (sums to 1; all 0.0 when the total is 0)."""
    total = sum(s.contribution for s in stats.values())
    return {agent: (s.contribution / total if total > 0 else 0.0) for agent, s in stats.items()}


@dataclass(frozen=True)
class LeaderboardRow:
    rank: int
    agent_id: AgentId
    reliability: float
    contribution: float
    """Share of the total contribution, in [0, 1]."""
    stats: AgentStats


def leaderboard(stats: Mapping[AgentId, AgentStats], top: int) -> list[LeaderboardRow]:
    """The ``top`` agents by reliability, then contribution (both descending), then id."""
    if top < 0:
        raise ValueError(f"top must be >= 0; got {top}")
    shares = contribution_score(stats)
    reliability = {agent: reliability_score(s) for agent, s in stats.items()}
    order = sorted(stats, key=lambda agent: (-reliability[agent], -shares[agent], agent))[:top]
    return [LeaderboardRow(rank=i + 1, agent_id=agent, reliability=reliability[agent],
                           contribution=shares[agent], stats=stats[agent])
            for i, agent in enumerate(order)]
