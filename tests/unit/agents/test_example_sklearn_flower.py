"""The scikit-learn Flower example: same layout on every shard, and offline FedAvg learns."""

import numpy as np
import pytest
from flwr.client import NumPyClient

from agents.app import Config, FlowerTrainer, Parameters, as_trainer, layout_of
from examples.sklearn_flower import app

CLIENTS = 10
ROUNDS = 10
CONFIG: Config = {"server_round": 1, "local_epochs": 1, "batch_size": 32,
                  "learning_rate": 0.1, "proximal_mu": 0.0}


def fedavg(updates: list[tuple[Parameters, int]]) -> dict[str, np.ndarray]:
    weights = np.array([n for _, n in updates], dtype=np.float64)
    return {name: np.average([p[name] for p, _ in updates], axis=0, weights=weights)
            for name in updates[0][0]}


@pytest.fixture(params=["iid", "dirichlet:0.5"])
def partition(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FL_EXAMPLE_CLIENTS", str(CLIENTS))
    monkeypatch.setenv("FL_EXAMPLE_PARTITION", request.param)
    return str(request.param)


def test_every_client_has_the_layout_of_the_initial_parameters(partition: str) -> None:
    expected = layout_of(app.initial_parameters())
    assert expected == {"param_000": ((10, 64), "float64"), "param_001": ((10,), "float64")}
    for i in range(CLIENTS):
        client = app.make_client(f"agent-{i}")
        assert isinstance(client, NumPyClient)
        trainer = as_trainer(client)
        assert isinstance(trainer, FlowerTrainer)
        new, num_examples, _ = trainer.fit(app.initial_parameters(), CONFIG)
        assert layout_of(new) == expected and num_examples == client.num_examples


def test_agent_ids_map_to_shards_modulo_the_client_count(partition: str) -> None:
    same = [app.make_client(agent_id) for agent_id in ("agent-3", "agent-13", "site7-3")]
    assert all(np.array_equal(c.y_test, same[0].y_test) for c in same)
    with pytest.raises(ValueError, match="does not end in a number"):
        app.make_client("agent")


def test_offline_fedavg_reaches_ninety_percent_in_ten_rounds(partition: str) -> None:
    trainers = [FlowerTrainer(app.make_client(f"agent-{i}")) for i in range(CLIENTS)]
    model: Parameters = app.initial_parameters()
    for _ in range(ROUNDS):
        model = fedavg([trainer.fit(model, CONFIG)[:2] for trainer in trainers])
    assert app.test_accuracy(model) >= 0.90
    loss, _, metrics = trainers[0].evaluate(model, CONFIG)
    assert np.isfinite(loss) and 0.0 <= float(metrics["accuracy"]) <= 1.0
