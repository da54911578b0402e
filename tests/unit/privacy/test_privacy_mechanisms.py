"""Clipping, adaptive clipping and noise mechanisms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from federated_learning.privacy.mechanisms import (
    AdaptiveClipper,
    add_gaussian_noise,
    add_laplace_noise,
    central_noise_std,
    clip_l2,
    l2_norm,
    laplace_scale,
    local_noise_std,
    privatize_local,
    secure_rng,
    update_noise_multiplier,
)

SIGNIFICANCE = 1e-3


def test_clip_scales_all_layers_together_to_the_bound() -> None:
    update = [np.array([3.0, 0.0], dtype=np.float32), np.array([[0.0], [4.0]], dtype=np.float32)]

    clipped, norm = clip_l2(update, 1.0)

    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped[0], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped[1], [[0.0], [0.8]], rtol=1e-6)
    assert clipped[1].dtype == np.float32 and clipped[1].shape == (2, 1)
    assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)


def test_clip_leaves_small_updates_unchanged() -> None:
    update = [np.array([0.3, 0.4])]

    clipped, norm = clip_l2(update, 1.0)

    assert norm == pytest.approx(0.5)
    np.testing.assert_array_equal(clipped[0], update[0])
    assert clipped[0] is not update[0]


def test_clip_refuses_bad_bound_and_non_finite_update() -> None:
    with pytest.raises(ValueError, match="clip norm must be finite and > 0; got 0"):
        clip_l2([np.ones(2)], 0)
    with pytest.raises(ValueError, match="update norm must be finite"):
        clip_l2([np.array([np.nan])], 1.0)


def _sample_std_interval(n: int, std: float) -> tuple[float, float]:
    """Two-sided (1 - SIGNIFICANCE) range of the sample std of n normal draws: chi2(n-1)."""
    low, high = stats.chi2.ppf([SIGNIFICANCE / 2, 1 - SIGNIFICANCE / 2], n - 1)
    return std * math.sqrt(low / (n - 1)), std * math.sqrt(high / (n - 1))


def test_gaussian_noise_has_the_configured_std() -> None:
    rng = np.random.default_rng(7)
    layers: list[np.ndarray] = [np.zeros((300, 400), dtype=np.float32),
                                np.zeros(80_000, dtype=np.float64)]

    noisy = add_gaussian_noise(layers, 0.25, rng)

    for layer in noisy:
        low, high = _sample_std_interval(layer.size, 0.25)
        assert low < float(np.std(layer, ddof=1)) < high
        assert abs(float(np.mean(layer))) < 4 * 0.25 / math.sqrt(layer.size)
    assert noisy[0].dtype == np.float32 and noisy[1].dtype == np.float64


def test_gaussian_noise_passes_a_normality_test() -> None:
    noisy = add_gaussian_noise([np.zeros(20_000)], 2.0, np.random.default_rng(3))[0]

    assert stats.kstest(noisy, stats.norm(scale=2.0).cdf).pvalue > SIGNIFICANCE


def test_laplace_noise_has_the_configured_scale() -> None:
    noisy = add_laplace_noise([np.zeros(200_000)], 0.5, np.random.default_rng(11))[0]

    assert stats.kstest(noisy, stats.laplace(scale=0.5).cdf).pvalue > SIGNIFICANCE
    assert float(np.std(noisy)) == pytest.approx(math.sqrt(2) * 0.5, rel=0.01)


def test_noise_std_helpers_follow_the_sensitivity() -> None:
    assert central_noise_std(clip_norm=2.0, noise_multiplier=1.5, num_updates=10) == 0.3
    assert local_noise_std(clip_norm=2.0, noise_multiplier=1.5) == 3.0
    assert laplace_scale(l1_sensitivity=2.0, epsilon=0.5) == 4.0
    with pytest.raises(ValueError, match="number of updates must be >= 1; got 0"):
        central_noise_std(1.0, 1.0, 0)


def test_privatize_local_clips_then_adds_noise() -> None:
    update = [np.full(50_000, 10.0)]

    noisy, norm = privatize_local(update, 1.0, 2.0, np.random.default_rng(5))

    assert norm == pytest.approx(10.0 * math.sqrt(50_000))
    low, high = _sample_std_interval(50_000, 2.0)
    assert low < float(np.std(noisy[0], ddof=1)) < high
    assert float(np.mean(noisy[0])) == pytest.approx(1.0 / math.sqrt(50_000), abs=0.05)


def test_secure_rng_is_not_reproducible() -> None:
    assert secure_rng().integers(2**62) != secure_rng().integers(2**62)


def test_adaptive_clipper_converges_to_the_target_quantile() -> None:
    rng = np.random.default_rng(0)
    norm_distribution = stats.lognorm(s=0.5, scale=3.0)
    clipper = AdaptiveClipper(initial_norm=0.1, target_quantile=0.5, learning_rate=0.2,
                              count_noise_std=1.0, rng=rng)

    history = [clipper.update(norm_distribution.rvs(size=100, random_state=rng))
               for _ in range(400)]

    assert np.mean(history[-100:]) == pytest.approx(norm_distribution.median(), rel=0.1)


def test_adaptive_clipper_tracks_a_high_quantile() -> None:
    rng = np.random.default_rng(1)
    clipper = AdaptiveClipper(10.0, target_quantile=0.9, learning_rate=0.2,
                              count_noise_std=0.0, rng=rng)

    history = [clipper.update(rng.exponential(1.0, size=200)) for _ in range(400)]

    assert np.mean(history[-100:]) == pytest.approx(-math.log(0.1), rel=0.1)


def test_adaptive_clipper_moves_geometrically() -> None:
    clipper = AdaptiveClipper(1.0, 0.5, 0.2, 0.0, rng=np.random.default_rng(0))

    assert clipper.update_from_count(num_unclipped=10, num_updates=10) == pytest.approx(
        math.exp(-0.2 * 0.5))


def test_update_noise_multiplier_leaves_room_for_the_count() -> None:
    z_update = update_noise_multiplier(1.0, count_noise_std=5.0)

    assert (z_update**-2 + (2 * 5.0) ** -2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="count noise std must exceed half"):
        update_noise_multiplier(1.0, 0.4)
