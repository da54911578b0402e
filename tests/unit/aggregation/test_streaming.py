"""WeightedSum: updates folded a group at a time give their weighted mean, the same bits for any
thread count, and the mean-only rules take it as one row."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from federated_learning.aggregation import allocate_slabs, create_strategy
from federated_learning.aggregation.inputs import folds_updates
from federated_learning.aggregation.streaming import WeightedSum
from federated_learning.protocol.messages import SECURE_ALGORITHMS

RNG = np.random.default_rng(0)
GLOBAL = [RNG.normal(size=(30, 7)).astype(np.float32), RNG.normal(size=9_001).astype(np.float64)]
UPDATES = [[(layer + RNG.normal(size=layer.shape)).astype(layer.dtype) for layer in GLOBAL] for _ in range(11)]
EXAMPLES = [float(n) for n in RNG.integers(1, 50, size=len(UPDATES))]


def folded(group: int) -> WeightedSum:
    total = WeightedSum(GLOBAL)
    for first in range(0, len(UPDATES), group):
        total.add(UPDATES[first:first + group], EXAMPLES[first:first + group])
    return total


@pytest.mark.parametrize("group", [1, 3, 4, 8, 11])
def test_the_folded_mean_is_the_weighted_mean_in_each_layers_dtype(group: int) -> None:
    total = folded(group)

    assert total.count == len(UPDATES) and total.weight == sum(EXAMPLES)
    for i, (mean, layer) in enumerate(zip(total.mean(), GLOBAL, strict=True)):
        expected = np.average(np.stack([update[i].reshape(-1).astype(np.float64) for update in UPDATES]),
                              axis=0, weights=EXAMPLES)
        assert mean.dtype == layer.dtype and mean.shape == (layer.size,)
        np.testing.assert_allclose(mean, expected, rtol=1e-6 if layer.dtype == np.float32 else 1e-12)


def test_the_same_groups_give_the_same_bits_for_any_thread_count() -> None:
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = folded(4).mean()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        many = folded(4).mean()
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rule", sorted(SECURE_ALGORITHMS))
def test_a_mean_only_rule_given_the_folded_mean_as_one_row_matches_it_given_every_update(rule: str) -> None:
    params = {"proximal_mu": 0.1} if rule == "fedprox" else {}
    direct = create_strategy(rule, **params).aggregate(list(GLOBAL), [list(update) for update in UPDATES],
                                             [int(n) for n in EXAMPLES])
    row = allocate_slabs(list(GLOBAL), 1)
    for slab, mean in zip(row, folded(8).mean(), strict=True):
        slab[0] = mean
    via_mean = create_strategy(rule, **params).aggregate_slabs(list(GLOBAL), row, [int(sum(EXAMPLES))])

    for a, b in zip(direct, via_mean, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_bad_rows_and_sums_are_refused() -> None:
    total = WeightedSum(GLOBAL)
    with pytest.raises(ValueError, match="no update with a positive weight"):
        total.mean()
    with pytest.raises(ValueError, match="2 updates with 1 weights"):
        total.add(UPDATES[:2], [1.0])
    with pytest.raises(ValueError, match=r"layer 1: rows of sizes \[9000\]; expected 9001"):
        total.add([[GLOBAL[0], GLOBAL[1][:-1]]], [1.0])
    broken = [GLOBAL[0].copy(), GLOBAL[1].copy()]
    broken[1][5] = np.inf
    with pytest.raises(ValueError, match="layer 1: the weighted sum of the updates is not finite"):
        WeightedSum(GLOBAL).add([broken], [1.0])


def test_only_unscored_jobs_of_mean_only_rules_fold_their_updates() -> None:
    assert folds_updates("fedavg", scored=False) and folds_updates("fedadam", scored=False)
    assert not folds_updates("fedavg", scored=True)
    assert not folds_updates("krum", scored=False) and not folds_updates("fedbuff", scored=False)
