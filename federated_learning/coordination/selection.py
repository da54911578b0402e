"""Which agents take part in a round."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping

from federated_learning.monitoring.reliability import (
    AgentStats,
    contribution_score,
    reliability_score,
)

PRIOR_RELIABILITY = 0.5
"""Reliability of an agent with no history: the Beta(1, 1) prior's mean."""


def eligible_agents(
    datasets_by_agent: Mapping[str, Mapping[str, int]],
    alive: Iterable[str],
    dataset: str,
) -> list[str]:
    """Agents that are alive and hold at least one example of ``dataset``, sorted by id."""
    return sorted(
        agent for agent in alive if datasets_by_agent.get(agent, {}).get(dataset, 0) > 0
    )


def selection_size(target: int, over_selection: float, available: int) -> int:
    """How many agents to ask: ``ceil(target * over_selection)``, capped by who is available."""
    return min(available, math.ceil(target * over_selection))


def select_agents(
    candidates: list[str],
    needed: int,
    over_selection: float,
    rng: random.Random,
    *,
    exclude: Iterable[str] = (),
    weights: dict[str, float] | None = None,
) -> list[str]:
    """Pick agents, over-selecting so dropouts don't stall the round.

    Uniformly at random, or proportionally to ``weights`` (a selection policy's scores).
    ``needed`` is how many more updates the round wants; ``exclude`` (agents already
    asked this round) are not asked again. Returns a sorted list.
    """
    excluded = set(exclude)
    pool = [agent for agent in candidates if agent not in excluded]
    count = selection_size(max(needed, 0), over_selection, len(pool))
    if weights is not None:
        return weighted_sample(pool, weights, count, rng)
    return sorted(rng.sample(pool, count))


def round_rng(training_id: str, round_number: int, attempt: int) -> random.Random:
    """A generator seeded by the round, so a restarted coordinator picks the same agents."""
    return random.Random(f"{training_id}/{round_number}/{attempt}")


MIN_SELECTION_WEIGHT = 0.05
"""Floor of a policy weight (relative to the largest), so no eligible agent is starved forever."""


def weighted_sample(candidates: list[str], weights: dict[str, float], count: int,
                    rng: random.Random) -> list[str]:
    """``count`` agents without replacement, each draw proportional to its weight.

    Efraimidis and Spirakis 2006, "Weighted random sampling with a reservoir": keep the
    ``count`` largest keys u^(1/w), u ~ U(0, 1). Weights are floored at
    ``MIN_SELECTION_WEIGHT`` times the largest. Returns a sorted list.
    """
    if count >= len(candidates):
        return sorted(candidates)
    top = max((weights.get(a, 0.0) for a in candidates), default=0.0)
    floor = MIN_SELECTION_WEIGHT * top if top > 0 else 1.0
    keyed = sorted(candidates, key=lambda a: rng.random() ** (1.0 / max(weights.get(a, 0.0), floor)),
                   reverse=True)
    return sorted(keyed[:count])


def under_hourly_cap(candidates: list[str], asked_last_hour: dict[str, int], cap: int | None) -> list[str]:
    """Candidates asked fewer than ``cap`` times in the last hour (all when ``cap`` is None)."""
    if cap is None:
        return candidates
    return [a for a in candidates if asked_last_hour.get(a, 0) < cap]


def policy_weights(policy: str, candidates: list[str], dataset_sizes: dict[str, int],
                   stats: Mapping[str, AgentStats]) -> dict[str, float] | None:
    """Selection weights of a training's policy; None for uniform ``random``.

    - ``importance``: proportional to the examples an agent holds of the training's dataset;
    - ``reliability``: the agent's reliability score (completion, lateness, anomaly flags);
    - ``contribution``: the agent's share of all contributions so far: per committed round,
      its examples times max(0, cosine of its update to the round's median update), so agents
      whose updates pulled the model where it went gain and opposing ones gain nothing
      (``Keys.agent_contributions``); floored so newcomers still get picked.
    """
    if policy == "random":
        return None
    if policy == "importance":
        return {a: float(dataset_sizes.get(a, 0)) for a in candidates}
    if policy == "reliability":
        return {a: reliability_score(stats[a]) if a in stats else PRIOR_RELIABILITY for a in candidates}
    if policy == "contribution":
        shares = contribution_score({a: stats[a] for a in candidates if a in stats})
        return {a: shares.get(a, 0.0) for a in candidates}
    raise ValueError(f"unknown selection policy '{policy}'; known: random, importance, reliability, contribution")
