import numpy as np
import pytest

from federated_learning.aggregation import aggregate_memory_banks
from federated_learning.aggregation.memory_bank import client_quotas


def clustered_bank(seed, centers, per_center, width=4):
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [c + 0.01 * rng.standard_normal((per_center, width)) for c in centers]
    ).astype(np.float32)


def test_quotas_follow_example_counts():
    quotas = client_quotas(np.array([100, 100, 100]), np.array([1, 1, 2]), 8)

    assert quotas.tolist() == [2, 2, 4]


def test_quota_beyond_a_bank_size_passes_to_the_others():
    quotas = client_quotas(np.array([1, 100]), np.array([9, 1]), 10)

    assert quotas.tolist() == [1, 9]


def test_small_union_is_returned_whole():
    banks = [np.ones((2, 3), np.float32), np.zeros((1, 3), np.float32)]

    merged = aggregate_memory_banks(banks, [1, 1], 5)

    np.testing.assert_array_equal(merged, np.concatenate(banks))


def test_random_subsample_takes_quota_rows_from_each_bank():
    banks = [np.full((50, 3), 1.0, np.float32), np.full((50, 3), 2.0, np.float32)]

    merged = aggregate_memory_banks(banks, [3, 1], 20, method="random", seed=1)

    assert merged.shape == (20, 3)
    assert (merged[:, 0] == 1.0).sum() == 15


def test_coreset_covers_every_cluster_once_before_repeating():
    centers = np.eye(4) * 10.0
    banks = [clustered_bank(0, centers[:2], 30), clustered_bank(1, centers[2:], 30)]

    merged = aggregate_memory_banks(banks, [1, 1], 4, method="coreset", seed=0)

    nearest = np.argmin(((merged[:, None, :] - centers[None]) ** 2).sum(axis=2), axis=1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]


def test_coreset_is_reproducible_for_a_seed():
    banks = [clustered_bank(2, np.eye(4), 40), clustered_bank(3, -np.eye(4), 40)]

    a = aggregate_memory_banks(banks, [1, 2], 10, seed=7)
    b = aggregate_memory_banks(banks, [1, 2], 10, seed=7)

    np.testing.assert_array_equal(a, b)


def test_coreset_projects_wide_features():
    rng = np.random.default_rng(4)
    banks = [rng.standard_normal((30, 300)).astype(np.float32) for _ in range(2)]

    merged = aggregate_memory_banks(banks, [1, 1], 10, projection_dim=16)

    assert merged.shape == (10, 300)
    union = np.concatenate(banks)
    assert all((union == row).all(axis=1).any() for row in merged)


def test_banks_of_different_widths_are_rejected():
    with pytest.raises(ValueError, match="memory bank 1 has 5 features; bank 0 has 4"):
        aggregate_memory_banks([np.zeros((3, 4)), np.zeros((3, 5))], [1, 1], 2)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method must be one of"):
        aggregate_memory_banks([np.zeros((3, 4))], [1], 2, method="kmeans")


def test_nan_in_a_bank_is_rejected():
    bank = np.zeros((3, 4))
    bank[1, 2] = np.nan

    with pytest.raises(ValueError, match="memory bank 0 contains NaN or Inf"):
        aggregate_memory_banks([bank], [1], 2)


def test_zero_example_count_is_rejected():
    with pytest.raises(ValueError, match="client 0 example count must be > 0; got 0"):
        aggregate_memory_banks([np.zeros((3, 4))], [0], 2)
