"""Which agents take part in a round."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping


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
) -> list[str]:
    """Pick agents uniformly at random, over-selecting so dropouts don't stall the round.

    ``needed`` is how many more updates the round wants; ``exclude`` (agents already
    asked this round) are not asked again. Returns a sorted list.
    """
    excluded = set(exclude)
    pool = [agent for agent in candidates if agent not in excluded]
    count = selection_size(max(needed, 0), over_selection, len(pool))
    return sorted(rng.sample(pool, count))


def round_rng(training_id: str, round_number: int, attempt: int) -> random.Random:
    """A generator seeded by the round, so a restarted coordinator picks the same agents."""
    return random.Random(f"{training_id}/{round_number}/{attempt}")
