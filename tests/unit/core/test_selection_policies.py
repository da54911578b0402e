import random
from collections import Counter

import pytest

from federated_learning.coordination.selection import (
    policy_weights,
    select_agents,
    under_hourly_cap,
    weighted_sample,
)
from federated_learning.monitoring.reliability import AgentStats

AGENTS = [f"a{i}" for i in range(10)]


def picks(weights: dict[str, float] | None, trials: int = 2000) -> Counter[str]:
    rng = random.Random(0)
    counts: Counter[str] = Counter()
    for _ in range(trials):
        counts.update(select_agents(AGENTS, 3, 1.0, rng, weights=weights))
    return counts


def stats(completed: int, dropped: int, flagged: int = 0, examples: int = 10) -> AgentStats:
    return AgentStats(asked=completed + dropped, completed=completed, late=0, dropped=dropped,
                      flagged=flagged, examples=examples, contribution=float(examples))


def test_random_policy_picks_everyone_about_equally() -> None:
    counts = picks(policy_weights("random", AGENTS, {}, {}))
    assert max(counts.values()) / min(counts.values()) < 1.3


def test_importance_favours_agents_with_more_examples() -> None:
    sizes = {a: (100 if a in ("a0", "a1") else 5) for a in AGENTS}
    counts = picks(policy_weights("importance", AGENTS, sizes, {}))
    assert counts["a0"] > 3 * counts["a5"] and counts["a1"] > 3 * counts["a6"]


def test_reliability_avoids_agents_that_drop_out() -> None:
    history = {a: stats(completed=20, dropped=0) for a in AGENTS}
    history["a3"] = stats(completed=1, dropped=19)
    counts = picks(policy_weights("reliability", AGENTS, {}, history))
    assert counts["a3"] < 0.3 * counts["a4"]


def test_contribution_favours_contributors_but_never_starves_newcomers() -> None:
    history = {a: stats(completed=10, dropped=0, examples=500 if a == "a9" else 50) for a in AGENTS[:-1]}
    history["a9"] = stats(completed=10, dropped=0, examples=500)
    weights = policy_weights("contribution", AGENTS + ["new"], {}, history)
    assert weights is not None and weights["a9"] > weights["a0"]
    rng = random.Random(1)
    assert any("new" in weighted_sample(AGENTS + ["new"], weights, 3, rng) for _ in range(2000))


def test_hourly_cap_leaves_out_busy_agents() -> None:
    assert under_hourly_cap(AGENTS[:3], {"a0": 4, "a1": 1}, cap=2) == ["a1", "a2"]
    assert under_hourly_cap(AGENTS[:3], {"a0": 4}, cap=None) == AGENTS[:3]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown selection policy 'best'"):
        policy_weights("best", AGENTS, {}, {})
