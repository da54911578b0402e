import itertools

import numpy as np
import pytest

from federated_learning.aggregation.order_statistics import (
    batcher_network,
    coordinate_mean_of_ranks,
    range_network,
    sorting_network,
)


def run_network(values, first, second):
    values = values.copy()
    for a, b in zip(first, second):
        low, high = np.minimum(values[a], values[b]), np.maximum(values[a], values[b])
        values[a], values[b] = low, high
    return values


@pytest.mark.parametrize("n", range(1, 13))
def test_batcher_network_sorts_every_zero_one_input(n):
    inputs = np.array(list(itertools.product([0, 1], repeat=n)), dtype=np.int8).T

    first, second = sorting_network(n)

    np.testing.assert_array_equal(run_network(inputs, first, second), np.sort(inputs, axis=0))


@pytest.mark.parametrize("n", [13, 40, 69, 100])
def test_pruned_network_yields_the_ranks_asked_for(n):
    values = np.random.default_rng(n).standard_normal((n, 300))
    lo, hi = n // 5, n - n // 5

    first, second = range_network(n, lo, hi)
    ranked = run_network(values, first, second)

    np.testing.assert_allclose(np.sort(ranked[lo:hi], axis=0), np.sort(values, axis=0)[lo:hi])
    assert len(first) < len(batcher_network(n))


def test_kernel_reads_only_the_requested_rows():
    slab = np.random.default_rng(0).standard_normal((8, 70)).astype(np.float32)
    rows = np.array([6, 1, 3], dtype=np.int64)
    out = np.empty(70, np.float32)

    finite = coordinate_mean_of_ranks(slab, rows, 1, 2, out)

    assert finite
    np.testing.assert_array_equal(out, np.median(slab[rows], axis=0))
