"""merge_banks: quotas, the weighted and unweighted pools, small unions, input checks."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from federated_learning.memory_bank import merge_banks
from federated_learning.memory_bank.merge import client_quotas


def clustered_bank(seed: int, centers: NDArray[np.float64], per_center: int) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    width = centers.shape[1]
    return np.concatenate(
        [c + 0.01 * rng.standard_normal((per_center, width)) for c in centers]
    ).astype(np.float32)


def test_quotas_follow_example_counts() -> None:
    quotas = client_quotas(np.array([100, 100, 100]), np.array([1, 1, 2]), 8)

    assert quotas.tolist() == [2, 2, 4]


def test_quotas_give_the_largest_remainders_the_leftover_rows() -> None:
    # raw shares 10 * [1, 2, 4] / 7 = [1.43, 2.86, 5.71]: floors [1, 2, 5], one row left
    # goes to the largest remainder, 0.86.
    quotas = client_quotas(np.array([100, 100, 100]), np.array([1, 2, 4]), 10)

    assert quotas.tolist() == [1, 3, 6]


def test_quota_beyond_a_bank_size_passes_to_the_others() -> None:
    quotas = client_quotas(np.array([1, 100]), np.array([9, 1]), 10)

    assert quotas.tolist() == [1, 9]


def test_small_union_is_returned_whole() -> None:
    banks: list[NDArray[np.floating]] = [np.ones((2, 3), np.float32), np.zeros((1, 3))]

    merged = merge_banks(banks, [1, 1], 5)

    assert merged.dtype == np.float32
    np.testing.assert_array_equal(merged, np.concatenate(banks))


def test_weighted_random_takes_quota_rows_from_each_bank() -> None:
    banks = [np.full((50, 3), 1.0, np.float32), np.full((50, 3), 2.0, np.float32)]

    merged = merge_banks(banks, [3, 1], 20, method="random", seed=1)

    assert merged.shape == (20, 3)
    assert (merged[:, 0] == 1.0).sum() == 15


@pytest.mark.parametrize("method", ["coreset", "random"])
def test_weighted_shares_follow_example_counts(method: str) -> None:
    rng = np.random.default_rng(0)
    banks = [rng.standard_normal((40, 4)).astype(np.float32) + 10.0 * i for i in range(3)]

    merged = merge_banks(banks, [1, 2, 4], 10, method=method)

    owner = np.rint(merged[:, 0] / 10.0).astype(int)
    assert np.bincount(owner, minlength=3).tolist() == [1, 3, 6]


def test_unweighted_coreset_gives_ten_times_the_examples_no_extra_rows() -> None:
    # Two agents with the same four well-separated clusters each, 30 rows per cluster;
    # agent 1 says it saw 10x the examples. One pool: the 8 picks cover the 8 clusters,
    # 4 from each agent, whatever the counts.
    centers = 10.0 * np.eye(8)
    banks = [clustered_bank(0, centers[:4], 30), clustered_bank(1, centers[4:], 30)]

    unweighted = merge_banks(banks, [1, 10], 8, weighted=False)
    weighted = merge_banks(banks, [1, 10], 8, weighted=True)

    assert (unweighted[:, :4].max(axis=1) > 5).sum() == 4
    assert (weighted[:, :4].max(axis=1) > 5).sum() == 1


def test_unweighted_random_is_a_uniform_sample_of_the_union() -> None:
    banks = [np.full((10, 2), 0.0, np.float32), np.full((990, 2), 1.0, np.float32)]

    merged = merge_banks(banks, [1000, 1], 100, method="random", weighted=False, seed=3)

    assert merged.shape == (100, 2)
    assert (merged[:, 0] == 0.0).sum() < 10


def test_coreset_covers_every_cluster_once_before_repeating() -> None:
    centers = np.eye(4) * 10.0
    banks = [clustered_bank(0, centers[:2], 30), clustered_bank(1, centers[2:], 30)]

    merged = merge_banks(banks, [1, 1], 4, method="coreset", seed=0)

    nearest = np.argmin(((merged[:, None, :] - centers[None]) ** 2).sum(axis=2), axis=1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]


def test_coreset_is_reproducible_for_a_seed() -> None:
    banks = [clustered_bank(2, np.eye(4), 40), clustered_bank(3, -np.eye(4), 40)]

    a = merge_banks(banks, [1, 2], 10, seed=7)
    b = merge_banks(banks, [1, 2], 10, seed=7)

    np.testing.assert_array_equal(a, b)


def test_coreset_projects_wide_features_and_returns_union_rows() -> None:
    rng = np.random.default_rng(4)
    banks = [rng.standard_normal((30, 300)).astype(np.float32) for _ in range(2)]

    merged = merge_banks(banks, [1, 1], 10, projection_dim=16)

    assert merged.shape == (10, 300)
    union = np.concatenate(banks)
    assert all((union == row).all(axis=1).any() for row in merged)


def test_banks_of_different_widths_are_rejected() -> None:
    with pytest.raises(ValueError, match="memory bank 1 has 5 features; bank 0 has 4"):
        merge_banks([np.zeros((3, 4)), np.zeros((3, 5))], [1, 1], 2)


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        merge_banks([np.zeros((3, 4))], [1], 2, method="kmeans")


def test_nan_in_a_bank_is_rejected() -> None:
    bank = np.zeros((3, 4))
    bank[1, 2] = np.nan

    with pytest.raises(ValueError, match="memory bank 0 contains NaN or Inf"):
        merge_banks([bank], [1], 2)


def test_integer_bank_is_rejected() -> None:
    with pytest.raises(ValueError, match="memory bank 0 has dtype int64; must be floating point"):
        merge_banks([np.zeros((3, 4), np.int64)], [1], 2)


def test_zero_example_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="bank 0 example count must be an int >= 1; got 0"):
        merge_banks([np.zeros((3, 4))], [0], 2)


def test_zero_target_is_rejected() -> None:
    with pytest.raises(ValueError, match="target_size must be an int >= 1; got 0"):
        merge_banks([np.zeros((3, 4))], [1], 0)


def test_no_banks_are_rejected() -> None:
    with pytest.raises(ValueError, match="no memory banks to merge"):
        merge_banks([], [], 2)
