import random

from federated_learning.coordination.rounds import RoundDecision, decide_round, weighted_mean
from federated_learning.coordination.selection import (
    eligible_agents,
    round_rng,
    select_agents,
    selection_size,
)


def decide(**overrides: float) -> RoundDecision:
    args = {"accepted": 0, "responded": 0, "selected": 6, "target": 5, "min_clients": 3, "now": 0.0,
                "deadline_at": 10.0, "attempt": 1, "max_attempts": 3}
    args.update(overrides)
    return decide_round(**args)  # type: ignore[arg-type]


def test_round_waits_while_updates_are_missing() -> None:
    assert decide(accepted=2, responded=2) is RoundDecision.WAIT


def test_round_aggregates_once_target_is_reached() -> None:
    assert decide(accepted=5, responded=5) is RoundDecision.AGGREGATE


def test_round_aggregates_at_deadline_with_minimum() -> None:
    assert decide(accepted=3, responded=3, now=10.0) is RoundDecision.AGGREGATE


def test_round_retries_at_deadline_below_minimum() -> None:
    assert decide(accepted=2, responded=2, now=10.0) is RoundDecision.RETRY


def test_round_fails_when_attempts_are_used_up() -> None:
    assert decide(accepted=2, now=10.0, attempt=3) is RoundDecision.FAIL


def test_round_aggregates_early_when_everyone_answered() -> None:
    assert decide(accepted=4, responded=6) is RoundDecision.AGGREGATE


def test_selection_over_selects_and_caps_at_available() -> None:
    assert selection_size(10, 1.2, 100) == 12
    assert selection_size(10, 1.2, 7) == 7


def test_selection_skips_excluded_agents_and_is_sorted() -> None:
    chosen = select_agents([f"a{i}" for i in range(10)], 4, 1.0, random.Random(0), exclude={"a1", "a2"})
    assert len(chosen) == 4
    assert not {"a1", "a2"} & set(chosen)
    assert chosen == sorted(chosen)


def test_same_round_gives_same_selection() -> None:
    pool = [f"a{i}" for i in range(30)]
    assert select_agents(pool, 5, 1.2, round_rng("t", 3, 1)) == select_agents(pool, 5, 1.2, round_rng("t", 3, 1))


def test_eligible_agents_need_the_dataset_and_a_heartbeat() -> None:
    datasets = {"a": {"digits": 10}, "b": {"other": 5}, "c": {"digits": 0}, "d": {"digits": 3}}
    assert eligible_agents(datasets, ["a", "b", "c"], "digits") == ["a"]


def test_weighted_mean_weights_by_examples() -> None:
    assert weighted_mean([(1.0, 1), (0.0, 3)]) == 0.25
    assert weighted_mean([]) is None
