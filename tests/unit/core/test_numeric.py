"""The NaN/Inf check the aggregation and quantization kernels share."""

import numpy as np
import pytest

from federated_learning.numeric import all_finite


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_arrays_pass(dtype: type[np.floating]) -> None:
    values = np.array([-0.0, 1.0, -3.5e30 if dtype is np.float32 else -1e300, 2.0], dtype)
    assert all_finite(values)
    assert all_finite(values[:1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 1, 999])
def test_one_bad_entry_anywhere_fails(dtype: type[np.floating], bad: float, where: int) -> None:
    values = np.ones(1000, dtype)
    values[where] = bad
    assert not all_finite(values)
