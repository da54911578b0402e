#!/usr/bin/env python3
"""Tune the demo's local-training defaults with an in-process federated simulation.

69 simulated clients hold a Dirichlet(alpha) label-skewed split of scikit-learn's digits;
each round the selected clients train locally from the global model and the server
takes the example-weighted average of their new models (FedAvg: McMahan et al.,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", 2017,
arXiv:1602.05629). No services, no Redis: this only picks hyper-parameters.

Usage: .venv/bin/python scripts/tune-demo.py [--quick] [--seeds 0 1 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import HelpFormatter, use_venv

use_venv()

import argparse
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.data import ClientData, Dataset, make_client_datasets
from federated_learning.presets import Trainer, Weights, create_trainer

NUM_CLIENTS = 69
NUM_FEATURES = 64
NUM_CLASSES = 10
TARGET = 0.93
CHECKPOINTS = (10, 20, 30)
RECOMMENDED_ROUNDS = 20


@dataclass(frozen=True)
class FedConfig:
    """One simulated training: model, local SGD settings, clients per round, rounds."""

    trainer: str = "softmax"
    epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 0.2
    clients_per_round: int = NUM_CLIENTS
    rounds: int = max(CHECKPOINTS)
    proximal_mu: float = 0.0

    def label(self) -> str:
        """Compact description for the table."""
        mu = f" mu={self.proximal_mu:g}" if self.proximal_mu else ""
        return (
            f"{self.trainer:7s} E={self.epochs:<2d} B={self.batch_size:<2d} "
            f"lr={self.learning_rate:<4g} K={self.clients_per_round:<2d}{mu}"
        )


@dataclass(frozen=True)
class RunResult:
    """Global test accuracy after every round of one simulated training."""

    config: FedConfig
    seed: int
    accuracy: tuple[float, ...]
    seconds: float

    def at(self, rounds: int) -> float:
        """Accuracy after ``rounds`` rounds."""
        return self.accuracy[rounds - 1]

    def first_round_reaching(self, target: float) -> int | None:
        """First round whose global model reaches ``target`` and never drops below it after."""
        below = [i for i, acc in enumerate(self.accuracy) if acc < target]
        if not below:
            return 1
        last = below[-1] + 1
        return last + 1 if last < len(self.accuracy) else None


RECOMMENDED = FedConfig(epochs=10, batch_size=4, learning_rate=1.0)
EARLIER_DEMO = FedConfig(epochs=5, batch_size=8, learning_rate=0.1, clients_per_round=20)


def fedavg(models: Sequence[Weights], counts: Sequence[int]) -> Weights:
    """``sum_k n_k w_k / sum_k n_k`` per layer, float64 accumulation, float32 out."""
    total = float(sum(counts))
    averaged: Weights = {}
    for name, first in models[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for model, n in zip(models, counts, strict=True):
            acc += n * model[name].astype(np.float64)
        averaged[name] = (acc / total).astype(np.float32)
    return averaged


def run_round(
    trainer: Trainer,
    weights: Weights,
    clients: Sequence[ClientData],
    config: FedConfig,
    seed: int,
) -> Weights:
    """Train every given client from ``weights`` and average their new models."""
    models, counts = [], []
    for client in clients:
        new, result = trainer.train(
            weights,
            client.train.x,
            client.train.y,
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            proximal_mu=config.proximal_mu,
            seed=seed * 100_003 + client.client_id,
        )
        models.append(new)
        counts.append(result.num_examples)
    return fedavg(models, counts)


def simulate(
    config: FedConfig, clients: Sequence[ClientData], test: Dataset, seed: int
) -> RunResult:
    """Run ``config.rounds`` rounds of FedAvg from a seeded initial model."""
    start = time.perf_counter()
    trainer = create_trainer(config.trainer, num_features=NUM_FEATURES, num_classes=NUM_CLASSES)
    weights = trainer.init_model(seed)
    rng = np.random.default_rng(seed)
    accuracy = []
    for round_id in range(config.rounds):
        chosen = rng.choice(len(clients), size=config.clients_per_round, replace=False)
        selected = [clients[i] for i in np.sort(chosen)]
        weights = run_round(trainer, weights, selected, config, seed * 1_000 + round_id)
        accuracy.append(trainer.evaluate(weights, test.x, test.y).accuracy)
    return RunResult(config, seed, tuple(accuracy), time.perf_counter() - start)


def centralized(clients: Sequence[ClientData], test: Dataset, trainer_name: str) -> float:
    """Reference: one model trained on the union of all clients' local training data."""
    x = np.concatenate([c.train.x for c in clients])
    y = np.concatenate([c.train.y for c in clients])
    trainer = create_trainer(trainer_name, num_features=NUM_FEATURES, num_classes=NUM_CLASSES)
    lr = 0.5 if trainer_name == "softmax" else 0.1
    weights, _ = trainer.train(
        trainer.init_model(0), x, y, epochs=100, batch_size=32, learning_rate=lr, seed=0
    )
    return trainer.evaluate(weights, test.x, test.y).accuracy


def format_row(result: RunResult) -> str:
    """One table line: config, seed, accuracy at the checkpoints, first round >= target."""
    cells = " ".join(
        f"{result.at(r):.3f}" if r <= len(result.accuracy) else "  -  " for r in CHECKPOINTS
    )
    first = result.first_round_reaching(TARGET)
    return (
        f"{result.config.label():38s} s={result.seed} {cells}  "
        f"{first if first else '-':>4}  {result.seconds:5.1f}s"
    )


def print_table(title: str, results: Sequence[RunResult]) -> None:
    """Print a titled table of results."""
    print(f"\n## {title}", flush=True)
    print(f"{'config':38s} {'seed':4s} {'@10':5s} {'@20':5s} {'@30':5s}  >={TARGET}  time")
    for result in results:
        print(format_row(result), flush=True)


def score(result: RunResult) -> tuple[int, float]:
    """Sort key: fewest rounds to the target first, then higher accuracy at 10 rounds."""
    first = result.first_round_reaching(TARGET)
    return (first if first is not None else 10_000, -result.at(min(10, result.config.rounds)))


def grid(quick: bool) -> list[FedConfig]:
    """Softmax configurations searched with all clients each round."""
    epochs = (2, 10) if quick else (2, 5, 10, 20)
    batches = (4,) if quick else (4, 8, 16)
    rates = (0.5, 1.0) if quick else (0.1, 0.2, 0.5, 1.0, 2.0)
    return [
        FedConfig(epochs=e, batch_size=b, learning_rate=lr)
        for e, b, lr in itertools.product(epochs, batches, rates)
    ]


Datasets = dict[tuple[str, int], tuple[list[ClientData], Dataset]]


def run_many(
    configs: Sequence[FedConfig], datasets: Datasets, partition: str, seeds: Sequence[int]
) -> list[RunResult]:
    """Simulate every config on every seed's client split of ``partition``."""
    results = []
    for config, seed in itertools.product(configs, seeds):
        key = (partition, seed)
        if key not in datasets:
            datasets[key] = make_client_datasets(NUM_CLIENTS, partition, seed)
        clients, test = datasets[key]
        results.append(simulate(config, clients, test, seed))
    return results


def report_centralized(datasets: Datasets) -> None:
    """Print the accuracy of one model trained on all clients' local training data."""
    key = ("dirichlet:0.5", 0)
    datasets.setdefault(key, make_client_datasets(NUM_CLIENTS, key[0], key[1]))
    clients, test = datasets[key]
    print(
        f"centralized reference ({sum(len(c.train) for c in clients)} local-train examples,"
        f" {len(test)} test): softmax {centralized(clients, test, 'softmax'):.3f},"
        f" mlp {centralized(clients, test, 'mlp'):.3f}"
    )


def report_search(datasets: Datasets, quick: bool, seeds: Sequence[int], top: int) -> None:
    """Grid on the first seed, then the best ``top`` configs on every seed."""
    searched = sorted(run_many(grid(quick), datasets, "dirichlet:0.5", seeds[:1]), key=score)
    print_table(
        f"grid, softmax, K={NUM_CLIENTS}, dirichlet:0.5, seed {seeds[0]} (best 15)", searched[:15]
    )
    best = [r.config for r in searched[:top]]
    print_table("best grid configs on every seed", run_many(best, datasets, "dirichlet:0.5", seeds))


def report_recommended(datasets: Datasets, seeds: Sequence[int]) -> None:
    """Per-round curve of the recommended defaults, and the same with 20 of 69 clients."""
    results = run_many([RECOMMENDED], datasets, "dirichlet:0.5", seeds)
    print_table("recommended defaults", results)
    for result in results:
        curve = " ".join(f"{a:.3f}" for a in result.accuracy[:RECOMMENDED_ROUNDS])
        print(f"  seed {result.seed} rounds 1-{RECOMMENDED_ROUNDS}: {curve}")
    partial = [replace(RECOMMENDED, clients_per_round=20), EARLIER_DEMO]
    print_table(
        "20 of 69 clients per round (last row: scripts/demo.py's earlier defaults)",
        run_many(partial, datasets, "dirichlet:0.5", seeds),
    )


def report_mlp(datasets: Datasets, seeds: Sequence[int]) -> None:
    """The MLP (hidden 64) with all clients each round."""
    mlp = [
        FedConfig(trainer="mlp", epochs=e, batch_size=b, learning_rate=lr)
        for e, b, lr in [(5, 8, 0.1), (10, 8, 0.2), (10, 4, 0.2), (5, 4, 0.5), (10, 4, 0.5)]
    ]
    print_table("mlp (hidden 64), all clients", run_many(mlp, datasets, "dirichlet:0.5", seeds))


def report_fedprox(datasets: Datasets, seeds: Sequence[int]) -> None:
    """Dirichlet 0.1: FedAvg against FedProx (mu 0.01, 0.1), all and 20 clients per round."""
    configs = [
        replace(RECOMMENDED, proximal_mu=mu, clients_per_round=k)
        for k in (NUM_CLIENTS, 20)
        for mu in (0.0, 0.01, 0.1)
    ]
    print_table(
        "dirichlet:0.1, FedAvg vs FedProx", run_many(configs, datasets, "dirichlet:0.1", seeds)
    )


def main() -> None:
    """Search, confirm on more seeds, compare trainers and FedProx; print tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grid")
    parser.add_argument("--skip-grid", action="store_true", help="only the fixed comparisons")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds each configuration is confirmed on")
    parser.add_argument("--top", type=int, default=6, help="grid configs confirmed on all seeds")
    args = parser.parse_args()
    datasets: Datasets = {}
    report_centralized(datasets)
    if not args.skip_grid:
        report_search(datasets, args.quick, args.seeds, args.top)
    report_recommended(datasets, args.seeds)
    report_mlp(datasets, args.seeds)
    report_fedprox(datasets, args.seeds)


if __name__ == "__main__":
    main()
