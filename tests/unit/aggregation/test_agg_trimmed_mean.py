import numba
import numpy as np
import pytest

from federated_learning.aggregation import create_strategy
from federated_learning.aggregation.trimmed_mean import trimmed_mean

GLOBAL = [np.zeros(4, dtype=np.float32)]


def reference_trimmed_mean(values, beta):
    values = np.sort(np.asarray(values, dtype=np.float64), axis=0)
    cut = int(beta * values.shape[0])
    return values[cut : values.shape[0] - cut].mean(axis=0)


def test_trimmed_mean_of_five_drops_one_value_at_each_end():
    clients = [
        [np.array(v, dtype=np.float32)]
        for v in ([1, 5, 0, 2], [2, 4, 9, 2], [3, 3, 1, 2], [4, 2, 2, 7], [100, 1, 3, 2])
    ]

    result = create_strategy("trimmed_mean", beta=0.2).aggregate(GLOBAL, clients, [1] * 5)

    np.testing.assert_allclose(result[0], [3.0, 3.0, 2.0, 2.0], rtol=1e-7)


@pytest.mark.parametrize(
    ("num_clients", "beta"), [(3, 0.2), (10, 0.1), (69, 0.2), (8, 0.0), (7, 0.49)]
)
def test_trimmed_mean_matches_sorted_float64_formula(num_clients, beta):
    rng = np.random.default_rng(num_clients)
    updates = rng.standard_normal((num_clients, 3, 37)).astype(np.float32)

    result = create_strategy("trimmed_mean", beta=beta).aggregate(
        [np.zeros((3, 37), np.float32)], [[u] for u in updates], [1] * num_clients
    )

    np.testing.assert_allclose(
        result[0], reference_trimmed_mean(updates, beta), rtol=1e-6, atol=1e-7
    )


def test_trimmed_mean_ignores_example_counts():
    clients = [[np.array(v, dtype=np.float32)] for v in ([1, 2, 3, 4], [2, 2, 2, 2], [5, 0, 1, 3])]

    a = create_strategy("trimmed_mean", beta=0.0).aggregate(GLOBAL, clients, [1, 1, 1])
    b = create_strategy("trimmed_mean", beta=0.0).aggregate(GLOBAL, clients, [9, 1, 4])

    np.testing.assert_array_equal(a[0], b[0])


def test_trimmed_mean_resists_a_large_outlier():
    rng = np.random.default_rng(1)
    clients = [[1.0 + 0.01 * rng.standard_normal(4).astype(np.float32)] for _ in range(9)]
    clients.append([np.full(4, 1e30, dtype=np.float32)])

    result = create_strategy("trimmed_mean", beta=0.1).aggregate(GLOBAL, clients, [1] * 10)

    np.testing.assert_allclose(result[0], 1.0, atol=0.05)


def test_trimmed_mean_is_identical_for_one_and_two_threads():
    slab = np.random.default_rng(2).standard_normal((13, 20_001)).astype(np.float32)
    one, two = np.empty(20_001, np.float32), np.empty(20_001, np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        trimmed_mean([slab], 0.2, [one])
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        trimmed_mean([slab], 0.2, [two])
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_update_is_rejected_even_when_it_would_be_trimmed(bad):
    clients = [[np.arange(4, dtype=np.float32) + k] for k in range(5)]
    clients[3][0][1] = bad

    with pytest.raises(ValueError, match="client 3 layer 0 contains NaN or Inf"):
        create_strategy("trimmed_mean", beta=0.2).aggregate(GLOBAL, clients, [1] * 5)


@pytest.mark.parametrize("beta", [0.7, 0.5, -0.1])
def test_beta_outside_half_open_interval_is_rejected(beta):
    with pytest.raises(ValueError, match=rf"trimmed_mean beta must be in \[0, 0.5\); got {beta}"):
        create_strategy("trimmed_mean", beta=beta)


def test_float64_model_trimmed_mean_matches_formula():
    rng = np.random.default_rng(10)
    updates = rng.standard_normal((11, 50))

    result = create_strategy("trimmed_mean", beta=0.2).aggregate(
        [np.zeros(50)], [[u] for u in updates], [1] * 11
    )

    assert result[0].dtype == np.float64
    np.testing.assert_allclose(result[0], reference_trimmed_mean(updates, 0.2), rtol=1e-14)
