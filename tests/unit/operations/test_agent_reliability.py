import pytest

from federated_learning.monitoring.reliability import (
    AgentStats,
    contribution_score,
    leaderboard,
    reliability_score,
)


def stats(asked: int = 10, completed: int = 10, late: int = 0, dropped: int = 0, flagged: int = 0,
          contribution: float = 1.0) -> AgentStats:
    return AgentStats(asked=asked, completed=completed, late=late, dropped=dropped, flagged=flagged,
                      examples=100, contribution=contribution)


def test_reliability_follows_the_documented_formula() -> None:
    assert reliability_score(stats(asked=10, completed=8, late=2, dropped=2)) == pytest.approx(9 / 12 * 0.875)


def test_new_agent_starts_at_one_half() -> None:
    assert reliability_score(stats(asked=0, completed=0)) == 0.5


def test_open_tasks_count_neither_way() -> None:
    assert reliability_score(stats(asked=10, completed=2)) == reliability_score(stats(asked=2, completed=2))


def test_all_updates_flagged_scores_zero() -> None:
    assert reliability_score(stats(flagged=10)) == 0.0


def test_reliability_stays_in_unit_interval() -> None:
    for s in (stats(), stats(completed=0, dropped=10), stats(late=10), stats(asked=1000, completed=1000)):
        assert 0.0 <= reliability_score(s) <= 1.0


def test_inconsistent_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="completed \\+ dropped must be <= asked"):
        stats(asked=5, completed=5, dropped=1)
    with pytest.raises(ValueError, match="late and flagged must be <= completed"):
        stats(asked=5, completed=2, late=3)
    with pytest.raises(ValueError, match="must be >= 0"):
        stats(contribution=-1.0)


def test_contribution_scores_are_shares_of_the_total() -> None:
    assert contribution_score({"a": stats(contribution=1.0), "b": stats(contribution=3.0)}) == {"a": 0.25, "b": 0.75}
    assert contribution_score({"a": stats(contribution=0.0)}) == {"a": 0.0}


def test_leaderboard_orders_by_reliability_then_contribution_then_id() -> None:
    board = leaderboard({
        "flaky": stats(completed=5, dropped=5, contribution=9.0),
        "b-steady": stats(contribution=1.0),
        "a-steady": stats(contribution=1.0),
        "big-steady": stats(contribution=2.0),
    }, top=3)
    assert [(row.rank, row.agent_id) for row in board] == [(1, "big-steady"), (2, "a-steady"), (3, "b-steady")]
    assert board[0].contribution == pytest.approx(2 / 13)
