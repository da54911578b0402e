import numba
import numpy as np
import pytest

from federated_learning.aggregation import create_strategy, pairwise_sq_distances
from federated_learning.aggregation.krum import DISTANCE_CHUNKS, partial_sums_buffer


def flower_krum(updates, counts, num_malicious, to_keep):
    """Flower 1.4x aggregate_krum on flat float64 updates."""
    flat = np.asarray(updates, dtype=np.float64)
    distance_matrix = np.array([[np.linalg.norm(a - b) ** 2 for b in flat] for a in flat])
    num_closest = max(1, len(flat) - num_malicious - 2)
    scores = [np.sum(row[np.argsort(row)[1 : num_closest + 1]]) for row in distance_matrix]
    if to_keep > 0:
        best = np.argsort(scores)[::-1][len(scores) - to_keep :]
        weights = np.asarray(counts, dtype=np.float64)[best]
        return (weights[:, None] * flat[best]).sum(axis=0) / weights.sum()
    return flat[np.argmin(scores)]


def honest_and_attackers(seed, num_honest=9, num_attackers=3, d=12):
    rng = np.random.default_rng(seed)
    honest = [1.0 + 0.05 * rng.standard_normal(d) for _ in range(num_honest)]
    attackers = [-5.0 + rng.standard_normal(d) * 3.0 for _ in range(num_attackers)]
    return [np.asarray(u, dtype=np.float32) for u in honest + attackers]


def as_clients(updates):
    return [[u] for u in updates]


def test_distances_match_numpy_over_all_layers():
    rng = np.random.default_rng(0)
    slabs = [
        rng.standard_normal((6, 5000)).astype(np.float32),
        rng.standard_normal((6, 7)).astype(np.float32),
    ]
    flat = np.concatenate([s.astype(np.float64) for s in slabs], axis=1)
    expected = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)

    np.testing.assert_allclose(pairwise_sq_distances(slabs), expected, rtol=1e-5)


def test_krum_picks_the_update_with_the_smallest_neighbour_distances():
    updates = [
        np.array(u, dtype=np.float32)
        for u in ([0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 9, 0], [9, 9, 9, 9])
    ]

    result = create_strategy("krum", num_malicious_clients=1).aggregate(
        [np.zeros(4, np.float32)], as_clients(updates), [1] * 5
    )

    np.testing.assert_array_equal(result[0], [0, 0, 0, 0])


@pytest.mark.parametrize(("f", "keep"), [(3, 0), (2, 0), (3, 4), (0, 12)])
def test_krum_and_multikrum_match_flower(f, keep):
    updates = honest_and_attackers(1)
    counts = list(range(1, 13))

    result = create_strategy("krum", num_malicious_clients=f, num_clients_to_keep=keep).aggregate(
        [np.zeros(12, np.float32)], as_clients(updates), counts
    )

    np.testing.assert_allclose(result[0], flower_krum(updates, counts, f, keep), rtol=1e-6)


def test_krum_picks_from_the_honest_cluster_with_a_quarter_attackers():
    updates = honest_and_attackers(2)

    result = create_strategy("krum", num_malicious_clients=3).aggregate(
        [np.zeros(12, np.float32)], as_clients(updates), [1] * 12
    )

    assert any(np.array_equal(result[0], u) for u in updates[:9])


def test_multikrum_resists_a_large_outlier():
    updates = honest_and_attackers(3, num_honest=10, num_attackers=0)
    updates.append(np.full(12, 1e6, dtype=np.float32))

    result = create_strategy("multikrum", num_malicious_clients=1).aggregate(
        [np.zeros(12, np.float32)], as_clients(updates), [1] * 11
    )

    np.testing.assert_allclose(result[0], np.mean(updates[:10], axis=0), rtol=1e-5)


def test_multikrum_keeps_n_minus_f_by_default():
    updates = honest_and_attackers(4)
    counts = [2] * 12

    result = create_strategy("multikrum", num_malicious_clients=3).aggregate(
        [np.zeros(12, np.float32)], as_clients(updates), counts
    )

    np.testing.assert_allclose(result[0], flower_krum(updates, counts, 3, 9), rtol=1e-6)


def test_krum_needs_2f_plus_3_updates():
    updates = honest_and_attackers(5, num_honest=5, num_attackers=0)

    with pytest.raises(ValueError, match="krum needs at least 2\\*f\\+3 updates; got 5 with f=2"):
        create_strategy("krum", num_malicious_clients=2).aggregate(
            [np.zeros(12, np.float32)], as_clients(updates), [1] * 5
        )


def test_keeping_more_updates_than_received_is_rejected():
    updates = honest_and_attackers(6, num_honest=5, num_attackers=0)

    with pytest.raises(ValueError, match="num_clients_to_keep must be <= the number of updates"):
        create_strategy("multikrum", num_clients_to_keep=6).aggregate(
            [np.zeros(12, np.float32)], as_clients(updates), [1] * 5
        )


def test_nan_update_is_rejected():
    updates = honest_and_attackers(7)
    updates[4][3] = np.nan

    with pytest.raises(ValueError, match="client 4 layer 0 contains NaN or Inf"):
        create_strategy("krum").aggregate([np.zeros(12, np.float32)], as_clients(updates), [1] * 12)


def test_distances_are_identical_for_one_and_two_threads():
    slab = np.random.default_rng(8).standard_normal((11, 30_001)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = pairwise_sq_distances([slab])
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = pairwise_sq_distances([slab])
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, two)


def test_krum_needs_individual_updates():
    assert create_strategy("krum").requires_individual_updates
    assert create_strategy("multikrum").requires_individual_updates


def test_float64_krum_returns_the_chosen_update_exactly():
    updates = [u.astype(np.float64) for u in honest_and_attackers(9)]

    result = create_strategy("krum", num_malicious_clients=3).aggregate(
        [np.zeros(12)], as_clients(updates), [1] * 12
    )

    assert result[0].dtype == np.float64
    np.testing.assert_array_equal(result[0], flower_krum(updates, [1] * 12, 3, 0))


@pytest.mark.parametrize("scratch_size", [10, 69 * 69 * 2, 69 * 69 * 2 * 7 + 5, 10_000_000])
def test_distance_sums_fit_in_the_callers_scratch(scratch_size):
    slab = np.random.default_rng(5).standard_normal((69, 30_001)).astype(np.float32)
    scratch = np.empty(scratch_size, np.float32)

    partials = partial_sums_buffer(69, scratch)
    with_scratch = pairwise_sq_distances([slab], scratch)

    assert 1 <= partials.shape[0] <= DISTANCE_CHUNKS
    assert np.shares_memory(partials, scratch) == (scratch.nbytes >= 69 * 69 * 8)
    np.testing.assert_allclose(with_scratch, pairwise_sq_distances([slab]), rtol=1e-6)
