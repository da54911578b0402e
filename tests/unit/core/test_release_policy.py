import json

import numpy as np
import pytest

from federated_learning.coordination.state import TrainingState
from federated_learning.privacy import PrivacyAccountant, compute_noise_multiplier
from federated_learning.privacy.release import (
    ReleaseRefused,
    adaptive_count_noise_std,
    clip_norm_for,
    local_noise_std,
    plan_release,
    update_noise_multiplier,
)
from federated_learning.protocol.messages import (
    AdaptiveClippingConfig,
    AggregateReady,
    TrainingConfig,
)

CONFIG = TrainingConfig.model_validate({
    "dataset": "d", "model": {"num_features": 4, "num_classes": 2}, "rounds": 10})
LAYERS = {"w": np.zeros((200, 50), np.float32)}


def state(level: str) -> TrainingState:
    return TrainingState(training_id="t", config=CONFIG, min_clients=2, clients_per_round=4,
                         round_deadline_s=10, privacy_level=level, clip_norm=clip_norm_for(level, None))


def ready(num_examples: int = 100, max_client: int = 40) -> AggregateReady:
    return AggregateReady(training_id="t", round=1, attempt=1, base_version=0, model_digest="a" * 64,
                          contributors=["a", "b", "c"], num_examples=num_examples,
                          max_client_examples=max_client, aggregation_seconds=0.0)


def test_level_none_releases_unchanged_without_charge() -> None:
    plan = plan_release(state("none"), LAYERS, ready(), None)
    assert plan.noised_layers is None and plan.budget_json is None
    assert "without noise" in plan.report.note


def test_medium_level_adds_calibrated_gaussian_noise_and_charges_the_budget() -> None:
    plan = plan_release(state("medium"), LAYERS, ready(), None, rng=np.random.default_rng(0))
    z = compute_noise_multiplier(3.0, 1e-5, 1.0, CONFIG.rounds)
    expected_std = z * 1.0 * 40 / 100
    assert plan.report.noise_std == pytest.approx(expected_std)
    assert plan.noised_layers is not None
    assert np.std(plan.noised_layers["w"]) == pytest.approx(expected_std, rel=0.05)
    accountant = PrivacyAccountant.from_dict(json.loads(plan.budget_json or ""))
    assert accountant.get_epsilon() == pytest.approx(plan.report.epsilon_spent)
    assert 0 < plan.report.epsilon_spent < 3.0


def test_release_beyond_the_budget_is_refused() -> None:
    budget = None
    for _ in range(CONFIG.rounds):
        budget = plan_release(state("high"), LAYERS, ready(), budget, rng=np.random.default_rng(0)).budget_json
    with pytest.raises(ReleaseRefused, match="privacy budget exhausted"):
        plan_release(state("high"), LAYERS, ready(), budget)


def test_clip_norm_comes_from_the_level_unless_the_training_sets_one() -> None:
    assert clip_norm_for("none", None) is None
    assert clip_norm_for("medium", None) == 1.0
    assert clip_norm_for("medium", 0.3) == 0.3


def local_state(level: str) -> TrainingState:
    config = CONFIG.model_copy(update={"privacy_mode": "local"})
    return TrainingState(training_id="t", config=config, min_clients=2, clients_per_round=4, round_deadline_s=10,
                         privacy_level=level, clip_norm=clip_norm_for(level, None))


def test_local_dp_agents_get_calibrated_noise_and_the_release_adds_none() -> None:
    z = compute_noise_multiplier(3.0, 1e-5, 1.0, CONFIG.rounds)
    assert local_noise_std(local_state("medium")) == pytest.approx(z * 1.0)
    assert local_noise_std(state("medium")) is None
    plan = plan_release(local_state("medium"), LAYERS, ready(), None)
    assert plan.noised_layers is None and plan.report.mechanism == "gaussian-local"
    assert 0 < plan.report.epsilon_spent < 3.0 and plan.budget_json is not None


def test_local_dp_with_compression_is_refused() -> None:
    with pytest.raises(ValueError, match="local DP needs uncompressed updates"):
        TrainingConfig.model_validate({"dataset": "d", "model": {"num_features": 4, "num_classes": 2},
                                       "privacy_mode": "local", "local": {"compression": "q8"}})


def adaptive_state(level: str, **adaptive: float) -> TrainingState:
    config = CONFIG.model_copy(update={"adaptive_clipping": AdaptiveClippingConfig(**adaptive)})
    return TrainingState(training_id="t", config=config, min_clients=2, clients_per_round=40,
                         round_deadline_s=10, privacy_level=level, clip_norm=1.0)


def test_adaptive_count_noise_defaults_to_a_twentieth_of_the_cohort_or_z_under_central_dp() -> None:
    assert adaptive_count_noise_std(state("medium")) is None
    assert adaptive_count_noise_std(adaptive_state("none")) == pytest.approx(2.0)
    z = compute_noise_multiplier(3.0, 1e-5, 1.0, CONFIG.rounds)
    assert adaptive_count_noise_std(adaptive_state("medium")) == pytest.approx(max(2.0, z))
    assert adaptive_count_noise_std(adaptive_state("medium", count_noise_std=7.5)) == 7.5


def test_update_noise_multiplier_keeps_the_combined_release_at_z() -> None:
    z, sigma_b = 1.3, 2.0
    z_update = update_noise_multiplier(z, sigma_b)
    # Andrew et al.: releasing the update with z_update and the count with sigma_b (sensitivity 1/2
    # per agent) is one Gaussian mechanism with z**-2 = z_update**-2 + (2 sigma_b)**-2.
    assert z_update**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
    assert z_update > z
    with pytest.raises(ValueError, match="must exceed half the noise multiplier"):
        update_noise_multiplier(4.0, 1.5)


def test_central_release_with_adaptive_clipping_uses_the_update_noise_multiplier() -> None:
    training = adaptive_state("medium")
    plan = plan_release(training, LAYERS, ready(), None, rng=np.random.default_rng(0))
    z = compute_noise_multiplier(3.0, 1e-5, 1.0, CONFIG.rounds)
    z_update = update_noise_multiplier(z, adaptive_count_noise_std(training) or 0.0)
    assert plan.report.noise_std == pytest.approx(z_update * 1.0 * 40 / 100)
    assert "z_update" in plan.report.note
    # the budget is charged with z: the count and the update together cost one release
    plain = plan_release(state("medium"), LAYERS, ready(), None, rng=np.random.default_rng(0))
    assert plan.report.epsilon_spent == pytest.approx(plain.report.epsilon_spent)


def test_adaptive_clipping_with_too_little_count_noise_is_refused_at_start() -> None:
    from federated_learning.coordination.checks import refuse_training

    refusal = refuse_training(adaptive_state("high", count_noise_std=0.1))
    assert refusal is not None and "count noise std 0.1 must exceed half the noise multiplier" in refusal
    assert refuse_training(adaptive_state("high")) is None


def test_adaptive_clipping_with_local_dp_is_refused() -> None:
    with pytest.raises(ValueError, match="adaptive clipping noises the count"):
        TrainingConfig.model_validate({"dataset": "d", "model": {"num_features": 4, "num_classes": 2},
                                       "privacy_mode": "local", "adaptive_clipping": {}})


def laplace_state(level: str, mode: str = "central") -> TrainingState:
    config = CONFIG.model_copy(update={"noise_mechanism": "laplace", "privacy_mode": mode})
    return TrainingState(training_id="t", config=config, min_clients=2, clients_per_round=4,
                         round_deadline_s=10, privacy_level=level, clip_norm=clip_norm_for(level, None))


def test_laplace_releases_each_spend_epsilon_over_rounds_with_l1_calibrated_noise() -> None:
    from federated_learning.privacy.release import clip_norm_type, laplace_release_epsilon

    training = laplace_state("medium")
    plan = plan_release(training, LAYERS, ready(), None, rng=np.random.default_rng(0))

    release_epsilon = 3.0 / CONFIG.rounds
    assert laplace_release_epsilon(training) == pytest.approx(release_epsilon, rel=1e-8)
    scale = 1.0 * 40 / 100 / release_epsilon  # L1 sensitivity of the weighted mean / epsilon
    assert plan.report.mechanism == "laplace" and plan.report.delta == 1e-5  # the accountant's min(pure, RDP)
    assert plan.report.noise_std == pytest.approx(np.sqrt(2) * scale, rel=1e-8)
    assert plan.noised_layers is not None
    noise = plan.noised_layers["w"].astype(np.float64).ravel()
    assert np.std(noise) == pytest.approx(np.sqrt(2) * scale, rel=0.05)
    assert np.mean(np.abs(noise)) == pytest.approx(scale, rel=0.05)  # E|Laplace(b)| = b: not Gaussian
    assert plan.report.epsilon_spent == pytest.approx(release_epsilon, rel=1e-8)
    assert clip_norm_type(training) == "l1" and clip_norm_type(state("medium")) == "l2"


def test_laplace_budget_holds_exactly_rounds_releases() -> None:
    budget, spent = None, 0.0
    for _ in range(CONFIG.rounds):
        plan = plan_release(laplace_state("high"), LAYERS, ready(), budget, rng=np.random.default_rng(0))
        budget, spent = plan.budget_json, plan.report.epsilon_spent
    assert 0.99 < spent <= 1.0  # pure composition gives 1.0; the RDP bound at delta 1e-6 is a little tighter
    with pytest.raises(ReleaseRefused, match="privacy budget exhausted"):
        plan_release(laplace_state("high"), LAYERS, ready(), budget)


def test_local_laplace_agents_add_the_noise_and_the_release_adds_none() -> None:
    from federated_learning.privacy.release import local_laplace_scale

    training = laplace_state("low", "local")
    assert local_laplace_scale(training) == pytest.approx(2.0 / (8.0 / CONFIG.rounds), rel=1e-8)
    assert local_noise_std(training) is None and local_laplace_scale(laplace_state("low")) is None
    plan = plan_release(training, LAYERS, ready(), None)
    assert plan.noised_layers is None and plan.report.mechanism == "laplace-local"


def test_laplace_with_adaptive_clipping_is_refused() -> None:
    with pytest.raises(ValueError, match="proven for the Gaussian"):
        TrainingConfig.model_validate({"dataset": "d", "model": {"num_features": 4, "num_classes": 2},
                                       "noise_mechanism": "laplace", "adaptive_clipping": {}})


def test_l1_clipping_bounds_the_l1_norm_and_keeps_the_direction() -> None:
    from federated_learning.privacy.mechanisms import clip_to_norm, l1_norm

    update = [np.array([3.0, -4.0], np.float32), np.array([[1.0, 2.0]], np.float64)]
    clipped, norm = clip_to_norm(update, 5.0, "l1")
    assert norm == pytest.approx(10.0)
    assert l1_norm(clipped) == pytest.approx(5.0, rel=1e-6)
    assert [c.dtype for c in clipped] == [np.float32, np.float64]
    np.testing.assert_allclose(clipped[0], [1.5, -2.0])
    untouched, _ = clip_to_norm(update, 20.0, "l1")
    np.testing.assert_array_equal(untouched[1], update[1])
