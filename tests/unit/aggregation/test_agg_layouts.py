"""Mixed-dtype models as the rules see them: which layers are trained, in which precision, and
how integer layers are carried."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from federated_learning.aggregation import create_strategy
from federated_learning.aggregation.layouts import (
    carried_maximum,
    carried_names,
    for_rules,
    restore_dtype,
    trained_names,
)

MODEL = {
    "conv.weight": np.ones((2, 3), np.float16), "bn.running_mean": np.zeros(3, ml_dtypes.bfloat16),
    "bn.num_batches_tracked": np.array(4, np.int64), "fc.weight": np.ones(5, np.float32),
    "fc.bias": np.zeros(5, np.float64), "mask": np.array([True, False]),
}


def test_float_layers_are_trained_and_integer_layers_carried_in_model_order() -> None:
    assert trained_names(MODEL) == ["conv.weight", "bn.running_mean", "fc.weight", "fc.bias"]
    assert carried_names(MODEL) == ["bn.num_batches_tracked", "mask"]


def test_half_precision_is_computed_in_float32_and_rounded_back_once() -> None:
    assert for_rules(MODEL["conv.weight"]).dtype == np.float32
    assert for_rules(MODEL["bn.running_mean"]).dtype == np.float32
    assert for_rules(MODEL["fc.bias"]) is MODEL["fc.bias"]  # float64 stays as it is, no copy
    result = np.array([1.0 + 2 ** -12, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32)
    back = restore_dtype(result, MODEL["conv.weight"])
    assert back.dtype == np.float16 and back.shape == (2, 3)
    np.testing.assert_array_equal(back, result.astype(np.float16).reshape(2, 3))


def test_the_carried_value_is_the_elementwise_maximum_of_the_updates() -> None:
    values = [np.array([1, 7, 3]), np.array([5, 2, 3]), np.array([0, 0, 9])]
    np.testing.assert_array_equal(carried_maximum(values, np.zeros(3, np.int64)), [5, 7, 9])
    assert carried_maximum([], np.array(4, np.int64)) == 4  # nothing accepted: the global value
    assert carried_maximum([np.array([True, False]), np.array([False, False])], MODEL["mask"]).tolist() == [True, False]


def test_fedavg_of_half_layers_equals_the_float64_mean_within_the_dtype_precision() -> None:
    rng = np.random.default_rng(0)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        clients = [rng.normal(size=1000).astype(dtype) for _ in range(7)]
        counts = [int(n) for n in rng.integers(1, 100, size=7)]
        [aggregated] = create_strategy("fedavg").aggregate(
            [for_rules(np.zeros(1000, dtype))], [[for_rules(c)] for c in clients], counts)
        result = restore_dtype(aggregated, np.zeros(1000, dtype))
        exact = sum(n * c.astype(np.float64) for n, c in zip(counts, clients, strict=True)) / sum(counts)
        assert result.dtype == np.dtype(dtype)
        # One rounding to the dtype: at most half an ulp of the result, plus float32 accumulation.
        eps = float(np.finfo(dtype).eps)
        assert np.all(np.abs(result.astype(np.float64) - exact) <= eps * np.maximum(np.abs(exact), 2 ** -14))
