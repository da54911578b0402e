"""The PyTorch digits example: shards by agent id, and in-process FedAvg reaching 0.90."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from agents.app import Config, Parameters
from examples.pytorch_digits import app


@pytest.fixture(autouse=True)
def default_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FL_EXAMPLE_CLIENTS", raising=False)
    monkeypatch.delenv("FL_EXAMPLE_PARTITION", raising=False)


def fedavg(results: list[tuple[Parameters, int]]) -> dict[str, NDArray[Any]]:
    """Example-weighted mean of the float layers; the largest value of the integer layers."""
    total = sum(n for _, n in results)
    merged = {}
    for name, first in results[0][0].items():
        stack = np.stack([np.asarray(p[name]) for p, _ in results])
        if np.issubdtype(first.dtype, np.integer):
            merged[name] = stack.max(axis=0)
        else:
            weights = np.array([n / total for _, n in results]).reshape(-1, *[1] * first.ndim)
            merged[name] = (stack.astype(np.float64) * weights).sum(axis=0).astype(first.dtype)
    return merged


def test_the_agent_id_picks_the_shard_modulo_the_number_of_clients() -> None:
    assert app.agent_index("torch-7", 10) == 7
    assert app.agent_index("torch-17", 10) == 7
    assert app.agent_index("agent3", 4) == 3
    with pytest.raises(ValueError, match="'torch' does not end in a number"):
        app.agent_index("torch", 10)


def test_every_agent_starts_from_the_same_model_on_its_own_shard() -> None:
    a, b = app.make_trainer("torch-0"), app.make_trainer("torch-1")
    start_a, start_b = a.get_parameters({}), b.get_parameters({})
    for name in start_a:
        np.testing.assert_array_equal(start_a[name], start_b[name])
    assert start_a["1.num_batches_tracked"].dtype == np.int64
    config: Config = {"server_round": 1, "local_epochs": 1, "batch_size": 16,
                      "learning_rate": 0.1}
    assert a.fit(start_a, config)[1] != b.fit(start_b, config)[1]


def test_ten_agents_reach_ninety_percent_with_fedavg() -> None:
    trainers = [app.make_trainer(f"torch-{i}") for i in range(10)]
    model = trainers[0].get_parameters({})
    assert app.test_accuracy(model) < 0.3
    for server_round in range(1, app.ROUNDS + 1):
        config: Config = {"server_round": server_round, "local_epochs": app.LOCAL_EPOCHS,
                          "batch_size": app.BATCH_SIZE, "learning_rate": app.LEARNING_RATE,
                          "proximal_mu": 0.0, "training_id": "test"}
        results = []
        for trainer in trainers:
            layers, num_examples, _ = trainer.fit(model, config)
            results.append((layers, num_examples))
        model = fedavg(results)
    assert app.test_accuracy(model) >= 0.90
    loss, num_examples, metrics = trainers[0].evaluate(model, {})
    assert num_examples > 0 and loss > 0 and float(metrics["accuracy"]) >= 0.8
