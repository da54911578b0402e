"""greedy_k_center against a brute-force reference, its 2-approximation, local_coreset sizes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from numpy.typing import NDArray

from federated_learning.memory_bank import coverage_radius, greedy_k_center, local_coreset


def brute_force_greedy(
    points: NDArray[np.floating],
    first: int,
    k: int,
    owners: NDArray[np.int64] | None = None,
    quotas: NDArray[np.int64] | None = None,
) -> list[int]:
    """Gonzalez's greedy, all distances recomputed in float64 from every pick."""
    x = points.astype(np.float64)
    owner = np.zeros(len(x), np.int64) if owners is None else owners
    left = np.array([k]) if quotas is None else quotas.copy()
    picks = [first]
    left[owner[first]] -= 1
    while len(picks) < k:
        d = np.sqrt(((x[:, None, :] - x[picks][None]) ** 2).sum(axis=2)).min(axis=1)
        d[left[owner] <= 0] = -1.0
        d[picks] = -1.0
        if d.max() < 0:
            break
        picks.append(int(np.argmax(d)))
        left[owner[picks[-1]]] -= 1
    return picks


def farthest_distance(points: NDArray[np.floating], picks: NDArray[np.int64]) -> float:
    x = points.astype(np.float64)
    return float(np.sqrt(((x[:, None, :] - x[picks][None]) ** 2).sum(axis=2)).min(axis=1).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_picks_match_brute_force(seed: int) -> None:
    points = np.random.default_rng(seed).standard_normal((300, 6)).astype(np.float32)

    picks = greedy_k_center(points, 25, seed=seed)

    assert picks.dtype == np.int64
    assert picks.tolist() == brute_force_greedy(points, int(picks[0]), 25)


def test_greedy_picks_match_brute_force_on_clustered_data() -> None:
    rng = np.random.default_rng(5)
    centers = 20.0 * rng.standard_normal((12, 8))
    points = (centers[rng.integers(0, 12, 500)] + rng.standard_normal((500, 8))).astype(np.float32)

    picks = greedy_k_center(points, 60, seed=3)

    assert picks.tolist() == brute_force_greedy(points, int(picks[0]), 60)


def test_greedy_with_quotas_matches_brute_force_and_respects_them() -> None:
    rng = np.random.default_rng(7)
    points = rng.standard_normal((200, 5)).astype(np.float32)
    owners = rng.integers(0, 3, 200).astype(np.int64)
    quotas = np.array([2, 10, 0], dtype=np.int64)

    picks = greedy_k_center(points, 12, owners=owners, quotas=quotas, seed=1)

    assert np.bincount(owners[picks], minlength=3).tolist() == [2, 10, 0]
    assert picks.tolist() == brute_force_greedy(points, int(picks[0]), 12, owners, quotas)


def test_greedy_matches_brute_force_on_enough_rows_to_run_in_parallel() -> None:
    # 40,000 rows: the parallel rescans, chunking, compaction of the position buffer and
    # dropping an owner whose quota ran out all take part.
    rng = np.random.default_rng(11)
    points = rng.standard_normal((40_000, 3)).astype(np.float32)
    owners = (rng.random(40_000) < 0.1).astype(np.int64)
    quotas = np.array([1000, 50], dtype=np.int64)

    picks = greedy_k_center(points, 1050, owners=owners, quotas=quotas, seed=2)

    x = points.astype(np.float64)
    left = quotas.copy()
    min_sq = np.full(len(x), np.inf)
    expected = [int(picks[0])]
    while True:
        left[owners[expected[-1]]] -= 1
        min_sq = np.minimum(min_sq, ((x - x[expected[-1]]) ** 2).sum(axis=1))
        min_sq[expected[-1]] = -1.0
        candidates = np.where(left[owners] > 0, min_sq, -1.0)
        if candidates.max() < 0:
            break
        expected.append(int(np.argmax(candidates)))
    assert picks.tolist() == expected


def test_greedy_stops_when_no_eligible_row_is_left() -> None:
    points = np.arange(12, dtype=np.float32).reshape(6, 2)
    owners = np.array([0, 0, 0, 1, 1, 1])

    picks = greedy_k_center(points, 5, owners=owners, quotas=np.array([1, 2]))

    assert len(picks) == 3


def test_projection_keeps_picks_among_the_rows() -> None:
    points = np.random.default_rng(8).standard_normal((100, 300)).astype(np.float32)

    picks = greedy_k_center(points, 10, projection_dim=16)

    assert len(set(picks.tolist())) == 10 and picks.max() < 100


def test_coverage_is_within_twice_the_lower_bound() -> None:
    # The (k+1)-th pick is r away from the first k, and the k+1 picks are pairwise >= r
    # apart, so any k centers leave two of them in one ball: OPT >= r / 2.
    rng = np.random.default_rng(9)
    points = rng.standard_normal((400, 4)).astype(np.float32)
    k = 20

    picks = greedy_k_center(points, k + 1, seed=0)

    lower_bound = farthest_distance(points, picks[:k]) / 2.0
    radius = coverage_radius(points, points[picks[:k]])
    assert radius <= 2.0 * lower_bound * (1 + 1e-6)


def test_coverage_is_within_twice_the_exact_optimum_on_a_tiny_instance() -> None:
    points = np.random.default_rng(10).standard_normal((12, 2)).astype(np.float32)
    k = 3
    optimum = min(
        farthest_distance(points, np.array(centers))
        for centers in itertools.combinations(range(12), k)
    )

    for seed in range(5):
        radius = coverage_radius(points, points[greedy_k_center(points, k, seed=seed)])
        assert optimum * (1 - 1e-6) <= radius <= 2.0 * optimum * (1 + 1e-6)


def test_coverage_radius_of_a_line() -> None:
    points = np.array([[0.0], [1.0], [4.0]], dtype=np.float32)

    assert coverage_radius(points, np.array([[0.0], [3.0]], dtype=np.float32)) == 1.0


@pytest.mark.parametrize(
    ("n", "fraction", "max_rows", "expected"),
    [(100, 0.1, 1000, 10), (100, 0.101, 1000, 11), (100, 0.001, 1000, 1), (100, 0.5, 7, 7),
     (100, 1.0, 1000, 100), (3, 0.9, 1000, 3)],
)
def test_local_coreset_size(n: int, fraction: float, max_rows: int, expected: int) -> None:
    features = np.random.default_rng(n).standard_normal((n, 4))

    rows = local_coreset(features, fraction, max_rows)

    assert rows.shape == (expected, 4) and rows.dtype == np.float32
    assert all((features.astype(np.float32) == row).all(axis=1).any() for row in rows)


def test_local_coreset_keeps_all_rows_in_order_when_k_reaches_n() -> None:
    features = np.arange(8, dtype=np.float64).reshape(4, 2)

    np.testing.assert_array_equal(local_coreset(features, 1.0, 10), features.astype(np.float32))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_local_coreset_rejects_a_fraction_outside_0_1(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"coreset fraction must be in \(0, 1\]"):
        local_coreset(np.zeros((4, 2)), fraction, 10)


def test_local_coreset_rejects_zero_max_rows() -> None:
    with pytest.raises(ValueError, match="max_rows must be an int >= 1; got 0"):
        local_coreset(np.zeros((4, 2)), 0.5, 0)


def test_greedy_rejects_owners_without_quotas() -> None:
    with pytest.raises(ValueError, match="owners and quotas go together"):
        greedy_k_center(np.zeros((4, 2)), 2, owners=np.zeros(4, np.int64))
