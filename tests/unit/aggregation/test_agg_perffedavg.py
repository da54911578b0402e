import numpy as np
import pytest

from federated_learning.aggregation import create_strategy

GLOBAL = [np.zeros(4, dtype=np.float32)]
CLIENTS = [
    [np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)],
    [np.array([2.0, 0.0, 1.0, 8.0], dtype=np.float32)],
    [np.array([4.0, 4.0, 2.0, 0.0], dtype=np.float32)],
]
METRICS = [{"accuracy": 0.5}, {"accuracy": 0.25}, {"accuracy": 0.25}]


def test_weights_blend_example_share_and_accuracy_share():
    counts = [1, 1, 2]
    weights = 0.5 * np.array([0.25, 0.25, 0.5]) + 0.5 * np.array([0.5, 0.25, 0.25])
    expected = sum(w * c[0].astype(np.float64) for w, c in zip(weights, CLIENTS))

    result = create_strategy("perffedavg", alpha=0.5).aggregate(
        GLOBAL, CLIENTS, counts, client_metrics=METRICS
    )

    np.testing.assert_allclose(result[0], expected, rtol=1e-6)


def test_alpha_one_is_fedavg():
    counts = [3, 1, 2]

    ours = create_strategy("perffedavg", alpha=1.0).aggregate(
        GLOBAL, CLIENTS, counts, client_metrics=METRICS
    )

    np.testing.assert_array_equal(
        ours[0], create_strategy("fedavg").aggregate(GLOBAL, CLIENTS, counts)[0]
    )


def test_missing_accuracy_is_rejected():
    metrics = [{"accuracy": 0.5}, {"loss": 0.1}, {"accuracy": 0.2}]

    with pytest.raises(ValueError, match="client 1 reported no 'accuracy' metric"):
        create_strategy("perffedavg").aggregate(GLOBAL, CLIENTS, [1, 1, 1], client_metrics=metrics)


def test_missing_metrics_are_rejected():
    with pytest.raises(ValueError, match="perffedavg needs client_metrics with 'accuracy'"):
        create_strategy("perffedavg").aggregate(GLOBAL, CLIENTS, [1, 1, 1])


def test_negative_accuracy_is_rejected():
    metrics = [{"accuracy": 0.5}, {"accuracy": -0.1}, {"accuracy": 0.2}]

    with pytest.raises(ValueError, match="client 1 accuracy must be finite and >= 0; got -0.1"):
        create_strategy("perffedavg").aggregate(GLOBAL, CLIENTS, [1, 1, 1], client_metrics=metrics)


def test_alpha_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match=r"perffedavg alpha must be in \[0, 1\]; got 1.5"):
        create_strategy("perffedavg", alpha=1.5)
