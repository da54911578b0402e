import json

import numpy as np
import pytest

from federated_learning.coordination.state import TrainingState
from federated_learning.privacy import PrivacyAccountant, compute_noise_multiplier
from federated_learning.privacy.release import ReleaseRefused, clip_norm_for, local_noise_std, plan_release
from federated_learning.protocol.messages import AggregateReady, TrainingConfig

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
