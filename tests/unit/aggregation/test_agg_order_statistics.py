import itertools

import numpy as np
import pytest

from federated_learning.aggregation.order_statistics import (
    MEAN_OF_RANKS,
    NEAR_MEDIAN,
    batcher_network,
    coordinate_mean_of_ranks,
    coordinate_reduce,
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


# Sizes around the boundaries of the in-place phases for K = 69 and 1-3 workspaces:
# none, only the serial tile, the narrow phase, and the wide phase.
@pytest.mark.parametrize("d", [1, 65, 4_500, 13_000, 300_000, 1_200_001])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reduction_uses_out_as_scratch_and_ignores_the_task_count(d, dtype):
    slab = np.random.default_rng(d).standard_normal((69, d)).astype(dtype)
    rows = np.arange(69, dtype=np.int64)
    outputs = []

    for tasks in (1, 2, 3):
        out = np.full(d, np.nan, dtype)
        network = range_network(69, 34, 35)
        assert coordinate_reduce(slab, rows, network, MEAN_OF_RANKS, 34, 35, out, tasks)
        outputs.append(out)

    np.testing.assert_array_equal(outputs[0], np.median(slab, axis=0))
    for other in outputs[1:]:
        np.testing.assert_array_equal(other, outputs[0])


@pytest.mark.parametrize("d", [70, 13_000, 300_000])
def test_near_median_mode_matches_a_sorted_reference(d):
    slab = np.random.default_rng(d).standard_normal((11, d))
    rows = np.arange(11, dtype=np.int64)
    out = np.empty(d)
    ordered = np.sort(slab, axis=0)
    # Window s holds ranks s..s+6; its cost is how far its farther end is from the median.
    gaps = np.maximum(ordered[5] - ordered[:5], ordered[6:] - ordered[5])
    starts = np.argmin(gaps, axis=0)
    expected = np.array(
        [ordered[s : s + 7, c].mean() for c, s in enumerate(starts)], dtype=np.float64
    )

    assert coordinate_reduce(slab, rows, sorting_network(11), NEAR_MEDIAN, 7, 7, out, 2)

    np.testing.assert_allclose(out, expected, rtol=1e-12)
