import numpy as np
import pytest

from federated_learning.monitoring.anomaly import (
    MAD_TO_SIGMA,
    MEAN_AD_TO_SIGMA,
    REASON_DIRECTION,
    REASON_NON_FINITE,
    REASON_NORM,
    anomaly_conditions,
    flag_suspicious_updates,
    metric_jump_conditions,
    metric_jumps,
    robust_z_scores,
    score_updates,
)


def honest_round(num_honest: int = 10, seed: int = 0) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    global_layers = [rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    direction = [rng.normal(size=layer.shape) for layer in global_layers]
    updates = [[(g + d + 0.3 * rng.normal(size=g.shape)).astype(np.float32)
                for g, d in zip(global_layers, direction)] for _ in range(num_honest)]
    return global_layers, updates


def test_robust_z_scores_on_a_hand_example() -> None:
    np.testing.assert_allclose(robust_z_scores([1, 2, 3, 4, 100]),
                               np.array([-2, -1, 0, 1, 97]) / MAD_TO_SIGMA)


def test_robust_z_scores_fall_back_to_mean_absolute_deviation_when_mad_is_zero() -> None:
    np.testing.assert_allclose(robust_z_scores([5, 5, 5, 5, 10]), [0, 0, 0, 0, 5 / MEAN_AD_TO_SIGMA])


def test_robust_z_scores_of_equal_values_are_zero() -> None:
    np.testing.assert_array_equal(robust_z_scores([2.0, 2.0, 2.0]), [0.0, 0.0, 0.0])


def test_sign_flipped_and_scaled_updates_are_flagged_and_honest_ones_are_not() -> None:
    global_layers, updates = honest_round()
    deltas = [[u - g for u, g in zip(update, global_layers)] for update in updates[:2]]
    flipped = [g - d for g, d in zip(global_layers, deltas[0])]
    boosted = [g + 100 * d for g, d in zip(global_layers, deltas[1])]
    ids = [f"honest-{k}" for k in range(10)] + ["flipped", "boosted"]
    flags = flag_suspicious_updates(global_layers, updates + [flipped, boosted], ids)
    assert {flag.agent_id: flag.reasons for flag in flags} == {
        "flipped": (REASON_DIRECTION,), "boosted": (REASON_NORM,)}
    flipped_flag = next(flag for flag in flags if flag.agent_id == "flipped")
    assert flipped_flag.cosine < 0 and flipped_flag.cosine_z < -3.5


def test_every_agent_gets_statistics_in_input_order() -> None:
    global_layers, updates = honest_round(num_honest=3)
    scores = score_updates(global_layers, updates, ["a", "b", "c"])
    assert [s.agent_id for s in scores] == ["a", "b", "c"]
    assert not any(s.suspicious for s in scores)


def test_non_finite_update_is_flagged_without_spoiling_the_rest() -> None:
    global_layers, updates = honest_round(num_honest=4)
    broken = [layer.copy() for layer in updates[0]]
    broken[1][0] = np.nan
    flags = flag_suspicious_updates(global_layers, updates + [broken], ["a", "b", "c", "d", "nan"])
    assert [(flag.agent_id, flag.reasons) for flag in flags] == [("nan", (REASON_NON_FINITE,))]


def test_update_with_wrong_shape_is_rejected_naming_the_agent() -> None:
    global_layers, updates = honest_round(num_honest=2)
    with pytest.raises(ValueError, match="agent b's update has layer shapes"):
        flag_suspicious_updates(global_layers, [updates[0], [updates[1][0]]], ["a", "b"])


def test_conditions_name_agent_norm_and_z() -> None:
    global_layers, updates = honest_round()
    boosted = [g + 100 * (u - g) for g, u in zip(global_layers, updates[0])]
    ids = [f"honest-{k}" for k in range(10)] + ["boosted"]
    conditions = anomaly_conditions(flag_suspicious_updates(global_layers, updates + [boosted], ids), "t1", 7)
    assert [c.key for c in conditions] == ["suspicious_update:t1:boosted"]
    assert conditions[0].rule == "suspicious_update" and conditions[0].severity == "warning"
    assert "agent boosted" in conditions[0].message and "round 7" in conditions[0].message
    assert "robust z" in conditions[0].message and "robust rule" in conditions[0].action


def test_metric_jump_against_the_trend_is_detected() -> None:
    series = [float(i) for i in range(20)]
    series[10] -= 5.0
    assert metric_jumps(series) == [10]


def test_steady_trend_has_no_jumps() -> None:
    assert metric_jumps([0.5 + 0.25 * (i % 2) for i in range(12)]) == []
    assert metric_jumps([1.0] * 12) == []


def test_scale_floor_keeps_a_wiggle_on_a_plateau_from_being_a_jump() -> None:
    series = [0.9] * 11 + [0.901]
    assert metric_jumps(series) == [11]
    assert metric_jumps(series, min_scale=0.009) == []


def test_jump_condition_names_the_metric_round_and_trend() -> None:
    points = [(r, 0.5 + 0.02 * r) for r in range(1, 13)]
    points[10] = (11, 0.1)

    [condition] = metric_jump_conditions("t", "accuracy", points, round_number=11)

    assert (condition.key, condition.rule, condition.severity) == ("metric_jump:t:accuracy", "metric_jump", "warning")
    assert "accuracy 0.1 in round 11" in condition.message and "median 0.66" in condition.message
    assert "round 11's participants" in condition.action
    assert metric_jump_conditions("t", "accuracy", points, round_number=12) == []


def test_jump_condition_needs_enough_rounds_and_a_smooth_series_has_none() -> None:
    smooth = [(r, 1.0 - 0.9 * 0.8**r) for r in range(1, 31)]
    assert all(metric_jump_conditions("t", "loss", smooth[:n], n) == [] for n in range(1, 31))
    short = [(r, 0.5) for r in range(1, 9)] + [(9, 0.0)]
    assert metric_jump_conditions("t", "accuracy", short, 9) == []


def test_short_series_has_no_jumps() -> None:
    assert metric_jumps([0.1, 0.9, 0.1], window=5) == []


def test_scale_floor_caps_z_scores_of_a_tight_cluster() -> None:
    np.testing.assert_allclose(robust_z_scores([0.94, 0.94, 0.95, 0.93, 0.89], min_scale=0.05),
                               [0.0, 0.0, 0.2, -0.2, -1.0])


def test_too_few_updates_are_never_flagged_by_statistics() -> None:
    global_layers, updates = honest_round(num_honest=3)
    boosted = [g + 100 * (u - g) for g, u in zip(global_layers, updates[0], strict=True)]
    assert flag_suspicious_updates(global_layers, [*updates, boosted], ["a", "b", "c", "d"]) == []


def test_slab_scores_match_the_stacked_scores() -> None:
    from federated_learning.monitoring.anomaly import score_slabs, score_updates

    rng = np.random.default_rng(3)
    global_layers = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
    updates = [[g + rng.normal(scale=0.1, size=g.shape).astype(np.float32) for g in global_layers] for _ in range(9)]
    updates.append([g - 5 * (u - g) for g, u in zip(global_layers, updates[0], strict=True)])
    ids = [f"a{k}" for k in range(10)]
    slabs = [np.stack([u[i].reshape(-1) for u in updates]) for i in range(2)]
    medians = [np.median(slab, axis=0) for slab in slabs]
    stacked = score_updates(global_layers, updates, ids)
    streamed = score_slabs(global_layers, slabs, medians, ids)
    for a, b in zip(stacked, streamed, strict=True):
        assert a.agent_id == b.agent_id and a.reasons == b.reasons
        assert a.norm == pytest.approx(b.norm, rel=1e-5) and a.cosine == pytest.approx(b.cosine, abs=1e-5)
    assert streamed[-1].suspicious


def test_scores_of_each_updates_own_layers_against_their_median_equal_the_slab_scores() -> None:
    from federated_learning.aggregation import create_strategy
    from federated_learning.monitoring.anomaly import score_against_median, score_slabs

    global_layers, updates = honest_round(num_honest=12, seed=4)
    updates.append([g - 5 * (u - g) for g, u in zip(global_layers, updates[0], strict=True)])
    ids = [f"a{k}" for k in range(len(updates))]
    slabs = [np.stack([u[i].reshape(-1) for u in updates]) for i in range(2)]
    median = create_strategy("median").aggregate_slabs(global_layers, slabs, [1] * len(updates))

    from_slabs = score_slabs(global_layers, slabs, median, ids)
    from_updates = score_against_median(global_layers, updates, ids)

    assert from_updates == from_slabs
    assert [flag.agent_id for flag in from_updates if flag.suspicious] == [ids[-1]]
