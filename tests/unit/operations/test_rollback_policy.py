import pytest
from pydantic import ValidationError

from federated_learning.versioning.rollback import (
    RollbackConfig,
    RollbackPolicy,
    VersionScore,
    federated_accuracy,
    judge,
)


def history(*accuracies: float) -> list[VersionScore]:
    return [VersionScore(version=v, accuracy=a) for v, a in enumerate(accuracies)]


def test_config_defaults_are_seed_004s() -> None:
    config = RollbackConfig()
    assert (config.enabled, config.performance_threshold, config.consecutive_degradations,
            config.rollback_to_best) == (True, 0.05, 3, True)


def test_config_rejects_threshold_outside_open_unit_interval() -> None:
    with pytest.raises(ValidationError, match="performance_threshold must be in"):
        RollbackConfig(performance_threshold=1.0)
    with pytest.raises(ValidationError, match="consecutive_degradations must be >= 1"):
        RollbackConfig(consecutive_degradations=0)
    with pytest.raises(ValidationError):
        RollbackConfig(threshold=0.1)  # type: ignore[call-arg]


def test_no_rollback_before_the_nth_consecutive_degradation() -> None:
    assert judge(history(0.5, 0.8, 0.7, 0.7), RollbackConfig()) is None


def test_rollback_to_best_after_exactly_n_consecutive_degradations() -> None:
    decision = judge(history(0.5, 0.8, 0.7, 0.7, 0.7), RollbackConfig())
    assert decision is not None
    assert decision.target_version == 1
    assert decision.degraded_versions == [2, 3, 4]
    assert "0.8000" in decision.reason and "version 1" in decision.reason


def test_drop_within_threshold_is_not_degraded() -> None:
    assert judge(history(0.8, 0.77, 0.77, 0.77), RollbackConfig()) is None


def test_recovery_resets_the_streak() -> None:
    assert judge(history(0.5, 0.8, 0.7, 0.7, 0.79, 0.7, 0.7), RollbackConfig()) is None


def test_same_streak_is_not_decided_twice() -> None:
    scores = history(0.5, 0.8, 0.7, 0.7, 0.7, 0.7)
    assert judge(scores, RollbackConfig(), last_rollback_at_version=4) is None


def test_new_streak_after_a_rollback_is_decided_again() -> None:
    decision = judge(history(0.5, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7), RollbackConfig(),
                     last_rollback_at_version=4)
    assert decision is not None
    assert decision.degraded_versions == [5, 6, 7]


def test_rollback_to_previous_good_version_when_not_to_best() -> None:
    scores = history(0.5, 0.8, 0.78, 0.7, 0.7, 0.7)
    previous = judge(scores, RollbackConfig(rollback_to_best=False))
    best = judge(scores, RollbackConfig(rollback_to_best=True))
    assert previous is not None and best is not None
    assert (previous.target_version, best.target_version) == (2, 1)


def test_rollback_target_is_never_a_degraded_version() -> None:
    scores = history(0.5, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7)
    decision = judge(scores, RollbackConfig(rollback_to_best=False), last_rollback_at_version=4)
    assert decision is not None
    assert decision.target_version == 1


def test_server_accuracy_takes_precedence_over_federated() -> None:
    server_says_worse = [VersionScore(0, 0.8, server_accuracy=0.8)] + [
        VersionScore(v, 0.9, server_accuracy=0.6) for v in (1, 2, 3)]
    server_says_fine = [VersionScore(0, 0.8, server_accuracy=0.8)] + [
        VersionScore(v, 0.6, server_accuracy=0.8) for v in (1, 2, 3)]
    decision = judge(server_says_worse, RollbackConfig())
    assert decision is not None and decision.target_version == 0
    assert "server accuracy" in decision.reason
    assert judge(server_says_fine, RollbackConfig()) is None


def test_disabled_policy_never_decides() -> None:
    assert judge(history(0.8, 0.1, 0.1, 0.1), RollbackConfig(enabled=False)) is None


def test_policy_object_judges_like_the_function() -> None:
    policy = RollbackPolicy(RollbackConfig(consecutive_degradations=1))
    decision = policy.judge(history(0.8, 0.1))
    assert decision is not None and decision.degraded_versions == [1]


def test_history_out_of_version_order_is_rejected() -> None:
    with pytest.raises(ValueError, match="version 1 follows 2"):
        judge([VersionScore(2, 0.5), VersionScore(1, 0.5)], RollbackConfig())


def test_federated_accuracy_is_example_weighted() -> None:
    assert federated_accuracy([0.5, 1.0], [1, 3]) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="at least one evaluated example"):
        federated_accuracy([0.5], [0])
