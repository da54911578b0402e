"""Privacy levels map to documented (epsilon, delta, clip) targets."""

from __future__ import annotations

import math

import pytest

from federated_learning.privacy.accountant import PrivacyAccountant, compute_noise_multiplier
from federated_learning.privacy.levels import PrivacyLevel, privacy_targets


def test_levels_map_to_documented_targets() -> None:
    assert (privacy_targets(PrivacyLevel.LOW).epsilon, privacy_targets("low").delta) == (8.0, 1e-5)
    assert (privacy_targets("medium").epsilon, privacy_targets("medium").delta) == (3.0, 1e-5)
    assert (privacy_targets("high").epsilon, privacy_targets("high").delta) == (1.0, 1e-6)


def test_none_level_disables_privacy() -> None:
    targets = privacy_targets(PrivacyLevel.NONE)

    assert not targets.enabled
    assert math.isinf(targets.epsilon)
    assert targets.clip_norm is None


def test_stronger_levels_need_more_noise() -> None:
    levels = [PrivacyLevel.LOW, PrivacyLevel.MEDIUM, PrivacyLevel.HIGH]
    sigmas = [compute_noise_multiplier(privacy_targets(level).epsilon,
                                       privacy_targets(level).delta, 1.0, 50)
              for level in levels]

    assert sigmas == sorted(sigmas)


def test_enabled_levels_build_accountants() -> None:
    for level in (PrivacyLevel.LOW, PrivacyLevel.MEDIUM, PrivacyLevel.HIGH):
        targets = privacy_targets(level)
        assert targets.enabled
        assert PrivacyAccountant(targets.epsilon, targets.delta).remaining() == targets.epsilon


def test_unknown_level_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="one of 'none', 'low', 'medium', 'high'; got 'max'"):
        privacy_targets("max")
