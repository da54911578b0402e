import numpy as np
import pytest

from federated_learning.aggregation import create_strategy

GLOBAL = [np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)]
DELTAS = [
    [np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)],
    [np.array([2.0, 0.0, 1.0, 8.0], dtype=np.float32)],
    [np.array([4.0, 4.0, 2.0, 0.0], dtype=np.float32)],
]


def test_buffer_is_folded_in_with_staleness_discount():
    counts = [1, 1, 2]
    staleness = [0, 3, 8]
    weights = np.array([0.25, 0.25, 0.5]) / np.sqrt(1.0 + np.array(staleness))
    expected = 1.0 + 0.5 * sum(w * d[0].astype(np.float64) for w, d in zip(weights, DELTAS))

    result = create_strategy("fedbuff", buffer_size=3, server_learning_rate=0.5).aggregate(
        GLOBAL, DELTAS, counts, staleness=staleness
    )

    np.testing.assert_allclose(result[0], expected, rtol=1e-6)


def test_fresh_buffer_adds_the_weighted_mean_delta():
    result = create_strategy("fedbuff", buffer_size=3).aggregate(GLOBAL, DELTAS, [1, 1, 2])

    np.testing.assert_allclose(result[0], [3.75, 3.5, 3.0, 4.0], rtol=1e-7)


def test_more_updates_than_the_buffer_holds_are_rejected():
    with pytest.raises(ValueError, match="fedbuff buffer holds at most 2 updates; got 3"):
        create_strategy("fedbuff", buffer_size=2).aggregate(GLOBAL, DELTAS, [1, 1, 1])


def test_staleness_of_wrong_length_is_rejected():
    with pytest.raises(ValueError, match="got 2 staleness values for 3 updates"):
        create_strategy("fedbuff", buffer_size=3).aggregate(
            GLOBAL, DELTAS, [1, 1, 1], staleness=[0, 1]
        )


def test_zero_buffer_size_is_rejected():
    with pytest.raises(ValueError, match="fedbuff buffer_size must be >= 1; got 0"):
        create_strategy("fedbuff", buffer_size=0)
