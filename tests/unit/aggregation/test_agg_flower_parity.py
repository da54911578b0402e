"""Our rules against Flower 1.42's own code on the same inputs (rtol 1e-5).

Skipped when ``flwr`` does not import. Flower's import chain (typer -> click) raises
DeprecationWarnings, which this suite turns into errors, so the import ignores them.
Inputs sit around 1.0 (global in [1, 1.5), clients = global + 0.1 N(0, 1)) so that a
relative tolerance is meaningful for every coordinate: Flower computes in float32.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from federated_learning.aggregation import create_strategy

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    flwr = pytest.importorskip("flwr")
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import strategy as flwr_strategy
    from flwr.server.strategy import aggregate as flwr_aggregate

RTOL = 1e-5
# Odd sizes, and one layer spanning several 2048-coordinate chunks and 64-lane tiles.
SHAPES = ((3, 4), (5,), (71, 73))


def make_global(rng: np.random.Generator, dtype: type = np.float32) -> list[np.ndarray]:
    return [(1.0 + 0.5 * rng.random(shape)).astype(dtype) for shape in SHAPES]


def make_clients(
    rng: np.random.Generator,
    global_layers: list[np.ndarray],
    num_clients: int,
    drift: float = 0.0,
) -> tuple[list[list[np.ndarray]], list[int]]:
    """Clients = global + drift + 0.1 N(0, 1), in the global model's dtype."""
    clients = [
        [
            (layer + drift + 0.1 * rng.standard_normal(layer.shape)).astype(layer.dtype)
            for layer in global_layers
        ]
        for _ in range(num_clients)
    ]
    counts = [int(n) for n in rng.integers(1, 200, num_clients)]
    return clients, counts


def assert_layers_close(ours: list[np.ndarray], flowers: list[np.ndarray]) -> None:
    assert len(ours) == len(flowers)
    for got, expected in zip(ours, flowers, strict=True):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0.0)


def flower_results(
    clients: list[list[np.ndarray]], counts: list[int]
) -> list[tuple[list[np.ndarray], int]]:
    return [([layer.copy() for layer in layers], n) for layers, n in zip(clients, counts)]


@pytest.mark.parametrize("num_clients", [2, 7, 30])
def test_fedavg_matches_flower_aggregate(num_clients: int) -> None:
    rng = np.random.default_rng(num_clients)
    global_layers = make_global(rng)
    clients, counts = make_clients(rng, global_layers, num_clients)

    ours = create_strategy("fedavg").aggregate(global_layers, clients, counts)

    assert_layers_close(ours, flwr_aggregate.aggregate(flower_results(clients, counts)))


@pytest.mark.parametrize(
    ("num_clients", "f", "keep"), [(7, 1, 0), (11, 2, 0), (12, 3, 0), (11, 2, 5), (9, 0, 9)]
)
def test_krum_and_multikrum_match_flower_aggregate_krum(
    num_clients: int, f: int, keep: int
) -> None:
    rng = np.random.default_rng(100 + num_clients + keep)
    global_layers = make_global(rng)
    clients, counts = make_clients(rng, global_layers, num_clients)
    rule = "krum" if keep == 0 else "multikrum"

    ours = create_strategy(rule, num_malicious_clients=f, num_clients_to_keep=keep).aggregate(
        global_layers, clients, counts
    )

    expected = flwr_aggregate.aggregate_krum(flower_results(clients, counts), f, keep)
    assert_layers_close(ours, expected)


def test_krum_with_num_clients_to_keep_is_flowers_multikrum() -> None:
    rng = np.random.default_rng(7)
    global_layers = make_global(rng)
    clients, counts = make_clients(rng, global_layers, 10)

    ours = create_strategy("krum", num_malicious_clients=2, num_clients_to_keep=4).aggregate(
        global_layers, clients, counts
    )

    expected = flwr_aggregate.aggregate_krum(flower_results(clients, counts), 2, 4)
    assert_layers_close(ours, expected)


@pytest.mark.parametrize("num_clients", [1, 2, 5, 8, 69])
def test_median_matches_flower_aggregate_median(num_clients: int) -> None:
    rng = np.random.default_rng(200 + num_clients)
    global_layers = make_global(rng)
    clients, counts = make_clients(rng, global_layers, num_clients)

    ours = create_strategy("median").aggregate(global_layers, clients, counts)

    assert_layers_close(ours, flwr_aggregate.aggregate_median(flower_results(clients, counts)))


@pytest.mark.parametrize(("num_clients", "beta"), [(5, 0.0), (10, 0.1), (11, 0.2), (11, 0.45)])
def test_trimmed_mean_matches_flower_aggregate_trimmed_avg(num_clients: int, beta: float) -> None:
    rng = np.random.default_rng(300 + num_clients)
    global_layers = make_global(rng)
    clients, counts = make_clients(rng, global_layers, num_clients)

    ours = create_strategy("trimmed_mean", beta=beta).aggregate(global_layers, clients, counts)

    expected = flwr_aggregate.aggregate_trimmed_avg(flower_results(clients, counts), beta)
    assert_layers_close(ours, expected)


@pytest.mark.parametrize(("num_clients", "f"), [(3, 0), (7, 1), (12, 2)])
def test_bulyan_matches_flower_aggregate_bulyan(num_clients: int, f: int) -> None:
    rng = np.random.default_rng(400 + num_clients)
    global_layers = make_global(rng)
    clients, counts = make_clients(rng, global_layers, num_clients)

    ours = create_strategy("bulyan", num_malicious_clients=f).aggregate(
        global_layers, clients, counts
    )

    expected = flwr_aggregate.aggregate_bulyan(
        flower_results(clients, counts), f, flwr_aggregate.aggregate_krum, to_keep=0
    )
    assert_layers_close(ours, expected)


def fit_results(clients: list[list[np.ndarray]], counts: list[int]) -> list[tuple[Any, FitRes]]:
    ok = Status(code=Code.OK, message="")
    return [
        (
            None,
            FitRes(
                status=ok, parameters=ndarrays_to_parameters(layers), num_examples=n, metrics={}
            ),
        )
        for layers, n in zip(clients, counts)
    ]


FLOWER_STRATEGIES: dict[str, tuple[str, dict[str, float]]] = {
    "fedadam": ("FedAdam", {}),
    "fedadam-custom": ("FedAdam", {"eta": 0.03, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-3}),
    "fedyogi": ("FedYogi", {}),
    "fedyogi-custom": ("FedYogi", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}),
    "fedadagrad": ("FedAdagrad", {}),
    "fedadagrad-custom": ("FedAdagrad", {"eta": 0.02, "tau": 1e-4}),
    "fedavgm": ("FedAvgM", {"server_learning_rate": 1.0, "server_momentum": 0.9}),
    "fedavgm-lr": ("FedAvgM", {"server_learning_rate": 0.5, "server_momentum": 0.0}),
    "fedavgm-both": ("FedAvgM", {"server_learning_rate": 0.7, "server_momentum": 0.5}),
}


def run_both(case: str, dtype: type, drift: float) -> None:
    """Three rounds of Flower's Strategy.aggregate_fit and ours, compared after every round."""
    flower_name, params = FLOWER_STRATEGIES[case]
    rng = np.random.default_rng(sorted(FLOWER_STRATEGIES).index(case))
    start = make_global(rng, dtype)
    flower = getattr(flwr_strategy, flower_name)(
        initial_parameters=ndarrays_to_parameters(start), **params
    )
    ours = create_strategy(case.split("-")[0], **params)
    current = start

    for server_round in (1, 2, 3):
        clients, counts = make_clients(rng, current, 6, drift)
        aggregated, _ = flower.aggregate_fit(server_round, fit_results(clients, counts), [])
        current = ours.aggregate(current, clients, counts)

        assert aggregated is not None
        flowers = parameters_to_ndarrays(aggregated)
        assert [layer.dtype for layer in current] == [layer.dtype for layer in start]
        assert_layers_close(current, flowers)


@pytest.mark.parametrize("case", sorted(FLOWER_STRATEGIES))
def test_stateful_rules_match_flower_aggregate_fit_in_float64(case: str) -> None:
    run_both(case, np.float64, drift=0.0)


@pytest.mark.parametrize("case", sorted(FLOWER_STRATEGIES))
def test_stateful_rules_match_flower_aggregate_fit_in_float32(case: str) -> None:
    """float32 models, where Flower also computes in float32 and we in float64.

    The adaptive step m / (sqrt(v) + tau) amplifies the rounding of a mean update near
    zero: Flower's float32 FedAdagrad run differs from its own float64 run by up to 2e-5
    there. The drift keeps every coordinate's mean update away from zero, so both
    float32 results are within rounding of the exact value and 1e-5 is a fair bound.
    (Flower's FedAdam returns float64 here: its NumPy float64 step size promotes the
    weights under NumPy 2's rules. We keep the model's dtype.)
    """
    run_both(case, np.float32, drift=0.3)
