"""The suspicious-update rule on the demo's honest non-IID rounds (the full measurement is
scripts/calibrate-anomaly.py; its rates are in docs/robustness.md)."""

import numpy as np
import pytest

from agents.attacks import Attack, poison_update
from agents.data import make_client_datasets
from federated_learning.aggregation import create_strategy
from federated_learning.monitoring.anomaly import REASON_NORM, UpdateFlag, score_slabs
from federated_learning.presets import Weights, create_trainer

PER_ROUND = 20
ROUNDS = 4
"""Round 4 of seed 0 flagged an honest agent before the calibration (norm 2.1 times the median,
robust z 4.1)."""


def score(global_weights: Weights, models: list[Weights], counts: list[int]) -> list[UpdateFlag]:
    names = list(global_weights)
    layers = [global_weights[n] for n in names]
    slabs = [np.stack([m[n].reshape(-1) for m in models]) for n in names]
    median = create_strategy("median").aggregate_slabs(list(layers), slabs, counts)
    return score_slabs(layers, slabs, median, [f"agent-{k}" for k in range(len(models))])


@pytest.fixture(scope="module")
def demo_rounds() -> list[tuple[Weights, list[Weights], list[int]]]:
    """The first rounds of the demo's training in-process: 69 agents on a Dirichlet-0.5 split,
    20 per round, the demo's local training; each round's global model, new models and counts."""
    clients, _test = make_client_datasets(69, "dirichlet:0.5", 0)
    trainer = create_trainer("softmax", num_features=64, num_classes=10)
    weights = trainer.init_model(0)
    rng = np.random.default_rng(0)
    rounds = []
    for round_number in range(1, ROUNDS + 1):
        models, counts = [], []
        for i in np.sort(rng.choice(len(clients), size=PER_ROUND, replace=False)):
            client = clients[int(i)]
            new, result = trainer.train(weights, client.train.x, client.train.y, epochs=10, batch_size=4,
                                        learning_rate=1.0, seed=round_number * 1_009 + int(i))
            models.append(new)
            counts.append(int(result.num_examples))
        rounds.append((weights, models, counts))
        shares = np.asarray(counts, dtype=np.float64) / sum(counts)
        weights = {n: np.tensordot(shares, np.stack([m[n] for m in models]), axes=1).astype(np.float32)
                   for n in weights}
    return rounds


def test_honest_non_iid_rounds_flag_no_update(demo_rounds: list[tuple[Weights, list[Weights], list[int]]]) -> None:
    flagged = [(r, f.agent_id, f.norm_z) for r, (g, models, counts) in enumerate(demo_rounds, 1)
               for f in score(g, models, counts) if f.suspicious]
    assert flagged == []


@pytest.mark.parametrize("attack", [Attack.SIGN_FLIP, Attack.GAUSSIAN])
def test_the_largest_honest_update_poisoned_is_flagged(
        demo_rounds: list[tuple[Weights, list[Weights], list[int]]], attack: Attack) -> None:
    global_weights, models, counts = demo_rounds[-1]
    largest = int(np.argmax([sum(float(np.sum((m[n] - global_weights[n]) ** 2)) for n in m) for m in models]))
    poisoned = poison_update(attack, global_weights, models[largest], np.random.default_rng(0))

    flags = score(global_weights, [*models[:largest], poisoned, *models[largest + 1:]], counts)

    assert [(f.agent_id, f.reasons) for f in flags if f.suspicious] == [(f"agent-{largest}", (REASON_NORM,))]
