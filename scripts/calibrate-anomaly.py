#!/usr/bin/env python3
"""Calibrate the suspicious-update rule: false alarms on honest non-IID rounds, detection per attack.

Simulates the demo in-process (no deployment): 69 agents on a Dirichlet(0.5) label-skewed split
of digits, the demo's local training (softmax, 10 epochs, batch 4, learning rate 1.0) with the
agents' real trainer, and 20 updates per round scored exactly as the aggregator scores them
(:func:`~federated_learning.monitoring.anomaly.score_slabs` against the coordinate-wise median
from the ``median`` rule). In the attack runs 25% of the agents are malicious, as in
docs/robustness.md, and upload what :mod:`agents.attacks` makes them upload.

The global model moves by FedAvg over the round's honest updates only, so every run is scored
against the kind of model a clean or robust training holds (under plain FedAvg a sign-flipping
minority wrecks the model within a few rounds and then nothing is "normal" any more).

Reports, over all seeds: the false-alarm rate (honest updates flagged / honest updates scored,
rounds with any honest update flagged / rounds, and honest agents flagged at least once, i.e.
wrong ``suspicious_update`` alerts), and for each attack the detection rate (malicious updates
flagged / malicious updates scored, and malicious agents that took part flagged at least once,
i.e. alerted).

Usage: .venv/bin/python scripts/calibrate-anomaly.py [--rounds 30] [--seeds 0 1 2] [--quantiles]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.attacks import Attack, flip_labels, poison_update
from agents.data import ClientData, make_client_datasets
from agents.simulation import malicious_ids
from federated_learning.aggregation import create_strategy
from federated_learning.monitoring.anomaly import UpdateFlag, score_slabs
from federated_learning.presets import Trainer, Weights, create_trainer

NUM_FEATURES = 64
NUM_CLASSES = 10
DEMO_LOCAL = {"epochs": 10, "batch_size": 4, "learning_rate": 1.0}
"""scripts/demo.py's DEMO_TRAINING."""
CLEAN = "clean"


@dataclass
class Tally:
    """Counts of one scenario over every round and seed."""

    rounds: int = 0
    rounds_with_false_alarm: int = 0
    honest: int = 0
    honest_flagged: int = 0
    malicious: int = 0
    malicious_flagged: int = 0
    alerted_honest: set[tuple[int, str]] = field(default_factory=set)
    """(seed, agent) of honest agents flagged at least once: the alerts a run raises wrongly
    (the monitor keys a ``suspicious_update`` alert by training and agent)."""
    attackers: set[tuple[int, str]] = field(default_factory=set)
    alerted_attackers: set[tuple[int, str]] = field(default_factory=set)
    honest_cosine_z: list[float] = field(default_factory=list)
    honest_norm_z: list[float] = field(default_factory=list)

    def add_round(self, seed: int, flags: Sequence[UpdateFlag], bad: set[str]) -> None:
        self.rounds += 1
        honest = [f for f in flags if f.agent_id not in bad]
        self.honest += len(honest)
        self.honest_flagged += sum(f.suspicious for f in honest)
        self.rounds_with_false_alarm += any(f.suspicious for f in honest)
        self.malicious += len(flags) - len(honest)
        self.malicious_flagged += sum(f.suspicious for f in flags if f.agent_id in bad)
        self.alerted_honest |= {(seed, f.agent_id) for f in honest if f.suspicious}
        self.attackers |= {(seed, agent) for agent in bad}
        self.alerted_attackers |= {(seed, f.agent_id) for f in flags if f.agent_id in bad and f.suspicious}
        self.honest_cosine_z += [f.cosine_z for f in honest]
        self.honest_norm_z += [f.norm_z for f in honest]


def fedavg(models: Sequence[Weights], counts: Sequence[int]) -> Weights:
    """``sum_k n_k w_k / sum_k n_k`` per layer, float64 accumulation, float32 out."""
    weights = np.asarray(counts, dtype=np.float64) / float(sum(counts))
    return {name: np.tensordot(weights, np.stack([m[name] for m in models]).astype(np.float64), axes=1
                               ).astype(np.float32) for name in models[0]}


def score_round(global_weights: Weights, models: Sequence[Weights], counts: Sequence[int],
                agent_ids: Sequence[str]) -> list[UpdateFlag]:
    """The aggregator's scoring (``Aggregator._score_updates``) of one round's uploaded models."""
    names = list(global_weights)
    global_layers: list[NDArray[np.floating]] = [global_weights[n] for n in names]
    slabs = [np.stack([m[n].reshape(-1) for m in models]).astype(np.float32) for n in names]
    median = create_strategy("median").aggregate_slabs(list(global_layers), slabs, list(counts))
    return score_slabs(global_layers, slabs, median, list(agent_ids))


def train(trainer: Trainer, weights: Weights, client: ClientData, labels: NDArray[np.integer],
          seed: int) -> tuple[Weights, int]:
    new, result = trainer.train(weights, client.train.x, labels, seed=seed, **DEMO_LOCAL)  # type: ignore[arg-type]
    return new, int(result.num_examples)


def run(clients: Sequence[ClientData], attack: Attack | None, args: argparse.Namespace, seed: int,
        tally: Tally) -> None:
    """One simulated training of ``args.rounds`` rounds; add each round's flags to ``tally``."""
    trainer = create_trainer("softmax", num_features=NUM_FEATURES, num_classes=NUM_CLASSES)
    weights = trainer.init_model(seed)
    bad_ids = malicious_ids(len(clients), args.malicious, seed) if attack is not None else set()
    rng = np.random.default_rng(seed)
    for round_number in range(1, args.rounds + 1):
        chosen = np.sort(rng.choice(len(clients), size=args.per_round, replace=False))
        models: list[Weights] = []
        counts: list[int] = []
        ids: list[str] = []
        honest: list[int] = []
        for i in chosen:
            client = clients[int(i)]
            bad = int(i) in bad_ids
            labels = flip_labels(client.train.y, NUM_CLASSES) if bad and attack is Attack.LABEL_FLIP else client.train.y
            local, count = train(trainer, weights, client, labels, seed * 1_000_003 + round_number * 1_009 + int(i))
            if bad and attack is not None:
                local = poison_update(attack, weights, local, np.random.default_rng(round_number))
            else:
                honest.append(len(models))
            models.append(local)
            counts.append(count)
            ids.append(f"agent-{int(i):03d}")
        flags = score_round(weights, models, counts, ids)
        tally.add_round(seed, flags, {ids[k] for k in range(len(ids)) if k not in honest})
        weights = fedavg([models[k] for k in honest], [counts[k] for k in honest])


def rate(part: int, whole: int) -> str:
    return f"{part}/{whole} = {part / whole:.1%}" if whole else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=69)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--per-round", type=int, default=20, help="updates aggregated (and scored) per round")
    p.add_argument("--malicious", type=float, default=0.25)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--attacks", nargs="*", default=[a.value for a in Attack])
    p.add_argument("--quantiles", action="store_true", help="also print honest z-score quantiles")
    args = p.parse_args()
    scenarios: list[Attack | None] = [None, *(Attack(a) for a in args.attacks)]
    tallies = {CLEAN if a is None else a.value: Tally() for a in scenarios}
    for seed in args.seeds:
        clients, _test = make_client_datasets(args.clients, args.partition, seed)
        for attack in scenarios:
            run(clients, attack, args, seed, tallies[CLEAN if attack is None else attack.value])
    print(f"{args.clients} agents, {args.partition}, {args.rounds} rounds x {args.per_round} updates, "
          f"seeds {' '.join(map(str, args.seeds))}, {args.malicious:.0%} malicious in attack runs")
    print("| run | honest updates flagged | rounds with a false alarm | honest agents alerted "
          "| malicious updates flagged | malicious agents alerted |")
    print("|---|---|---|---|---|---|")
    for name, t in tallies.items():
        print(f"| {name} | {rate(t.honest_flagged, t.honest)} | {rate(t.rounds_with_false_alarm, t.rounds)} "
              f"| {len(t.alerted_honest)} | {rate(t.malicious_flagged, t.malicious)} "
              f"| {rate(len(t.alerted_attackers), len(t.attackers))} |")
    if args.quantiles:
        clean = tallies[CLEAN]
        for label, values in (("cosine_z", clean.honest_cosine_z), ("norm_z", clean.honest_norm_z)):
            q = np.quantile(values, [0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0])
            print(f"honest {label} quantiles (min .001 .01 .5 .99 .999 max): "
                  + " ".join(f"{v:+.2f}" for v in q))
    return 0


if __name__ == "__main__":
    sys.exit(main())
