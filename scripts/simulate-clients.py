#!/usr/bin/env python3
"""Run simulated agents on the digits data against a running deployment, and train.

Usage: .venv/bin/python scripts/simulate-clients.py --clients 69 --rounds 20 \
           [--partition iid|dirichlet:ALPHA] [--seed N] [--report FILE]

Finds the deployment through <data_dir>/run/deployment.json (written by
scripts/deploy-federated-learning.py) unless --redis-url and --dashboard-url are given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from agents.simulation import SimulationOptions, run_simulation
from federated_learning.config import ConfigError, load_settings
from federated_learning.deploy.launcher import read_deployment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SimulationOptions(redis_url="", dashboard_url="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--dashboard-url", default=None)
    p.add_argument("--api-key", default=None, help="default: the deployment's (deployment.json)")
    p.add_argument("--clients", type=int, default=defaults.clients)
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--partition", default=defaults.partition, help="iid or dirichlet:ALPHA")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--clients-per-round", type=int, default=defaults.clients_per_round)
    p.add_argument("--algorithm", default=defaults.algorithm)
    p.add_argument("--algorithm-params", type=json.loads, default={}, help="JSON object")
    p.add_argument("--trainer", default=defaults.trainer, choices=["softmax", "mlp"])
    p.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--proximal-mu", type=float, default=defaults.proximal_mu)
    p.add_argument("--privacy-level", default=defaults.privacy_level, choices=["none", "low", "medium", "high"])
    p.add_argument("--privacy-mode", default=defaults.privacy_mode, choices=["central", "local"],
                   help="central: the privacy manager noises the aggregate; local: each agent noises its update")
    p.add_argument("--noise-mechanism", default=defaults.noise_mechanism, choices=["gaussian", "laplace"],
                   help="gaussian (L2 clipping, RDP-calibrated) or laplace (L1 clipping, epsilon/rounds per release)")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="pairwise-masked secure aggregation: the server sees only each round's mean")
    p.add_argument("--clip-norm", type=float, default=None, help="L2 bound of each update (agents clip)")
    p.add_argument("--adaptive-clip-quantile", type=float, default=None,
                   help="adaptive clipping towards this quantile of the update norms")
    p.add_argument("--compression", default="none", choices=["none", "top_k", "random_k", "q8", "q4"])
    p.add_argument("--compression-fraction", type=float, default=0.1, help="share kept by top_k/random_k")
    p.add_argument("--malicious", type=float, default=0.0, help="fraction of attacking agents")
    p.add_argument("--attack", default="sign_flip", choices=["sign_flip", "gaussian", "label_flip"])
    p.add_argument("--timeout", type=float, default=defaults.timeout_s)
    p.add_argument("--report", type=Path, default=None, help="write a JSON report here")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> SimulationOptions:
    settings = load_settings(args.config)
    redis_url, dashboard_url = args.redis_url, args.dashboard_url
    api_key = args.api_key or settings.api_key
    if not (redis_url and dashboard_url and api_key):
        deployment = read_deployment(settings.data_dir.resolve())
        redis_url = redis_url or deployment["redis_url"]
        dashboard_url = dashboard_url or deployment["dashboard_url"]
        api_key = api_key or deployment["api_key"]
    return SimulationOptions(
        redis_url=redis_url, dashboard_url=dashboard_url, api_key=api_key, key_prefix=settings.redis_key_prefix,
        clients=args.clients, rounds=args.rounds, partition=args.partition, seed=args.seed,
        clients_per_round=args.clients_per_round, algorithm=args.algorithm,
        algorithm_params=args.algorithm_params, trainer=args.trainer, local_epochs=args.local_epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, proximal_mu=args.proximal_mu,
        privacy_level=args.privacy_level, privacy_mode=args.privacy_mode,
        noise_mechanism=args.noise_mechanism, timeout_s=args.timeout,
        malicious_fraction=args.malicious, attack=args.attack,
        compression=args.compression, compression_fraction=args.compression_fraction,
        secure_aggregation=args.secure_aggregation, clip_norm=args.clip_norm,
        adaptive_clip_quantile=args.adaptive_clip_quantile,
        state_dir=settings.data_dir.resolve() / "agent-state",
        heartbeat_interval_s=min(settings.heartbeat_interval_s, 5.0),
        round_deadline_s=settings.round_deadline_s,
    )


def print_round(row: dict[str, Any]) -> None:
    accuracy = row.get("eval_accuracy")
    loss = row.get("eval_loss")
    print(f"round {row['round']:3d}  accuracy of v{row['eval_of_version']} "
          f"{accuracy if accuracy is None else f'{accuracy:.3f}'}  "
          f"loss {loss if loss is None else f'{loss:.3f}'}  agents {row['participants']}/{row['selected']}  "
          f"{row['round_seconds']:.2f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = options_from(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{options.clients} agents, {options.partition} split, {options.rounds} rounds of "
          f"{options.algorithm}; dashboard {options.dashboard_url}", flush=True)
    report = asyncio.run(run_simulation(options, on_round=print_round))
    if args.report:
        report.write(args.report)
    print(f"training {report.training_id} {report.status}"
          + (f": {report.reason}" if report.reason else "")
          + f" in {report.seconds:.1f}s; final federated accuracy "
          f"{report.final_federated_accuracy if report.final_federated_accuracy is None else f'{report.final_federated_accuracy:.3f}'}",
          flush=True)
    if report.final_test_accuracy is None:
        print("final test accuracy: unavailable", flush=True)
        return 1
    print(f"final test accuracy: {report.final_test_accuracy:.3f}", flush=True)
    return 0 if report.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
