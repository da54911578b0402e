import numba
import numpy as np
import pytest

from federated_learning.aggregation import create_strategy
from federated_learning.aggregation.median import median

GLOBAL = [np.zeros(4, dtype=np.float32)]


def test_median_of_three_by_hand():
    clients = [[np.array(v, dtype=np.float32)] for v in ([1, 5, 0, 2], [2, 4, 9, 2], [3, 3, 1, -2])]

    result = create_strategy("median").aggregate(GLOBAL, clients, [1, 5, 9])

    np.testing.assert_array_equal(result[0], [2, 4, 1, 2])


def test_median_of_an_even_count_averages_the_middle_two():
    clients = [
        [np.array(v, dtype=np.float32)]
        for v in ([1, 5, 0, 2], [2, 4, 9, 2], [3, 3, 1, -2], [4, 0, 0, 8])
    ]

    result = create_strategy("median").aggregate(GLOBAL, clients, [1] * 4)

    np.testing.assert_array_equal(result[0], [2.5, 3.5, 0.5, 2])


@pytest.mark.parametrize("num_clients", [1, 2, 5, 16, 33, 69])
def test_median_matches_numpy_median(num_clients):
    rng = np.random.default_rng(num_clients)
    updates = rng.standard_normal((num_clients, 2, 45)).astype(np.float32)

    result = create_strategy("median").aggregate(
        [np.zeros((2, 45), np.float32)], [[u] for u in updates], [1] * num_clients
    )

    np.testing.assert_allclose(result[0], np.median(updates.astype(np.float64), axis=0), rtol=1e-6)


def test_median_resists_a_large_outlier():
    clients = [[np.full(4, v, dtype=np.float32)] for v in (0.9, 1.0, 1.1, 1.05)]
    clients.append([np.full(4, -1e30, dtype=np.float32)])

    result = create_strategy("median").aggregate(GLOBAL, clients, [1] * 5)

    np.testing.assert_array_equal(result[0], np.float32(1.0))


def test_median_is_identical_for_one_and_two_threads():
    slab = np.random.default_rng(3).standard_normal((10, 20_001)).astype(np.float32)
    one, two = np.empty(20_001, np.float32), np.empty(20_001, np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        median([slab], [one])
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        median([slab], [two])
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, two)


def test_nan_update_is_rejected():
    clients = [[np.zeros(4, np.float32)] for _ in range(3)]
    clients[0][0][0] = np.nan

    with pytest.raises(ValueError, match="client 0 layer 0 contains NaN or Inf"):
        create_strategy("median").aggregate(GLOBAL, clients, [1] * 3)


def test_median_takes_no_parameters():
    with pytest.raises(ValueError, match="median has no parameter 'beta'; accepted: none"):
        create_strategy("median", beta=0.1)


def test_float64_model_median_is_exact_and_float64():
    rng = np.random.default_rng(9)
    updates = rng.standard_normal((7, 100))

    result = create_strategy("median").aggregate([np.zeros(100)], [[u] for u in updates], [1] * 7)

    assert result[0].dtype == np.float64
    np.testing.assert_array_equal(result[0], np.median(updates, axis=0))


def test_float64_inf_is_rejected():
    updates = [np.zeros(4) for _ in range(3)]
    updates[1][3] = -np.inf

    with pytest.raises(ValueError, match="client 1 layer 0 contains NaN or Inf"):
        create_strategy("median").aggregate([np.zeros(4)], [[u] for u in updates], [1] * 3)


def test_signed_zeros_and_subnormals_are_ordered_as_numbers():
    values = np.array([-0.0, 0.0, -1e-45, 1e-45, -3.5, 2.0, -0.0], dtype=np.float32)
    clients = [[np.full(4, v, dtype=np.float32)] for v in values]

    result = create_strategy("median").aggregate(GLOBAL, clients, [1] * 7)

    assert result[0][0] == 0.0


@pytest.mark.parametrize("block_bytes", [1 << 24, 4 * 7 * 16, 4 * 7 * 5])
def test_median_of_separate_updates_equals_the_slab_median_in_any_column_blocks(monkeypatch, block_bytes):
    from federated_learning.aggregation import median as module

    monkeypatch.setattr(module, "MEDIAN_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(5)
    like = [np.zeros((6, 9), np.float32), np.zeros(7, np.float64)]
    updates = [[rng.normal(size=layer.shape).astype(layer.dtype) for layer in like] for _ in range(7)]

    result = module.median_of_updates(updates, like)

    for i, layer in enumerate(like):
        expected = np.median(np.stack([u[i].reshape(-1) for u in updates]), axis=0).astype(layer.dtype)
        np.testing.assert_array_equal(result[i], expected)
        assert result[i].dtype == layer.dtype


def test_median_of_separate_updates_is_none_when_an_update_holds_nan():
    from federated_learning.aggregation.median import median_of_updates

    updates = [[np.array([1.0, 2.0], np.float32)], [np.array([np.nan, 2.0], np.float32)], [np.ones(2, np.float32)]]

    assert median_of_updates(updates, [np.zeros(2, np.float32)]) is None
