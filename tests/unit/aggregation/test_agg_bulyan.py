import numba
import numpy as np
import pytest

from federated_learning.aggregation import create_strategy
from federated_learning.aggregation.bulyan import mean_closest_to_median


def flower_krum_index(flat, num_malicious):
    distance_matrix = np.array([[np.linalg.norm(a - b) ** 2 for b in flat] for a in flat])
    num_closest = max(1, len(flat) - num_malicious - 2)
    scores = [np.sum(row[np.argsort(row)[1 : num_closest + 1]]) for row in distance_matrix]
    return int(np.argmin(scores))


def flower_bulyan(updates, num_malicious):
    """Flower 1.4x aggregate_bulyan with aggregate_krum (to_keep=0), flat float64 updates."""
    remaining = [np.asarray(u, dtype=np.float64) for u in updates]
    theta = len(remaining) - 2 * num_malicious
    beta = theta - 2 * num_malicious
    selected = [remaining.pop(flower_krum_index(remaining, num_malicious)) for _ in range(theta)]
    stacked = np.array(selected)
    median = np.median(stacked, axis=0)
    indices = np.argpartition(np.abs(median - stacked), kth=beta - 1, axis=0)
    return np.take_along_axis(stacked, indices, axis=0)[:beta].mean(axis=0)


def test_bulyan_matches_flower_on_random_updates():
    rng = np.random.default_rng(0)
    updates = [rng.standard_normal(50).astype(np.float32) for _ in range(11)]

    result = create_strategy("bulyan", num_malicious_clients=2).aggregate(
        [np.zeros(50, np.float32)], [[u] for u in updates], [1] * 11
    )

    np.testing.assert_allclose(result[0], flower_bulyan(updates, 2), rtol=1e-6)


def test_bulyan_with_no_attackers_is_the_mean_of_values_nearest_the_median():
    updates = [np.array(v, dtype=np.float32) for v in ([1, 0, 0, 0], [2, 0, 0, 1], [3, 0, 6, 2])]

    result = create_strategy("bulyan").aggregate(
        [np.zeros(4, np.float32)], [[u] for u in updates], [1] * 3
    )

    np.testing.assert_allclose(result[0], [2, 0, 2, 1], rtol=1e-7)


def test_bulyan_resists_a_large_outlier():
    rng = np.random.default_rng(1)
    updates = [1.0 + 0.01 * rng.standard_normal(8).astype(np.float32) for _ in range(7)]
    updates.append(np.full(8, 1e6, dtype=np.float32))

    result = create_strategy("bulyan", num_malicious_clients=1).aggregate(
        [np.zeros(8, np.float32)], [[u] for u in updates], [1] * 8
    )

    np.testing.assert_allclose(result[0], 1.0, atol=0.05)


def test_bulyan_needs_4f_plus_3_updates():
    updates = [np.zeros(4, np.float32) for _ in range(6)]

    with pytest.raises(ValueError, match="bulyan needs at least 4\\*f\\+3 updates; got 6 with f=1"):
        create_strategy("bulyan", num_malicious_clients=1).aggregate(
            [np.zeros(4, np.float32)], [[u] for u in updates], [1] * 6
        )


def test_bulyan_kernel_is_identical_for_one_and_two_threads():
    slab = np.random.default_rng(2).standard_normal((9, 20_001)).astype(np.float32)
    rows = np.array([4, 0, 7, 2, 5], dtype=np.int64)
    one, two = np.empty(20_001, np.float32), np.empty(20_001, np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        mean_closest_to_median(slab, rows, 3, one, 1)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        mean_closest_to_median(slab, rows, 3, two, 2)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, two)


def test_inf_update_is_rejected():
    updates = [np.zeros(4, np.float32) for _ in range(3)]
    updates[2][1] = np.inf

    with pytest.raises(ValueError, match="client 2 layer 0 contains NaN or Inf"):
        create_strategy("bulyan").aggregate(
            [np.zeros(4, np.float32)], [[u] for u in updates], [1] * 3
        )


def test_float64_bulyan_matches_flower():
    rng = np.random.default_rng(3)
    updates = [rng.standard_normal(40) for _ in range(7)]

    result = create_strategy("bulyan", num_malicious_clients=1).aggregate(
        [np.zeros(40)], [[u] for u in updates], [1] * 7
    )

    assert result[0].dtype == np.float64
    np.testing.assert_allclose(result[0], flower_bulyan(updates, 1), rtol=1e-12)
