#!/usr/bin/env python3
"""Run simulated agents on the digits data against a running deployment, and train.

Usage: python3 scripts/simulate-clients.py --clients 69 --rounds 20
           [--partition iid|dirichlet:ALPHA] [--seed N] [--report FILE]

Finds the deployment through <data_dir>/run/deployment.json (written by
scripts/deploy-federated-learning.py) unless --redis-url, --dashboard-url and --api-key are
given. When the bus does not answer or refuses the credentials, it stops with one line and
exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import HelpFormatter, use_venv

use_venv()

import argparse
import asyncio
import json
import logging
from typing import Any

import httpx
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agents.simulation import SimulationOptions, SimulationReport, run_simulation
from federated_learning.bus.connection import RedisRefused, redacted
from federated_learning.config import ConfigError, load_settings
from federated_learning.deploy.launcher import failure_cause, read_deployment

CONNECT_ATTEMPTS = 5
"""Tries to reach the bus (backoff 0.1 s doubling: about 1.5 s) before giving up with one line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SimulationOptions(redis_url="", dashboard_url="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="config file whose data_dir holds run/deployment.json (default ./config.json)")
    p.add_argument("--redis-url", default=None, help="the bus (default: the deployment's)")
    p.add_argument("--dashboard-url", default=None, help="the dashboard (default: the deployment's)")
    p.add_argument("--api-key", default=None,
                   help="API key for the dashboard (default: config 'api_key', else the deployment's)")
    p.add_argument("--clients", type=int, default=defaults.clients, help="simulated agents")
    p.add_argument("--rounds", type=int, default=defaults.rounds, help="rounds of the training")
    p.add_argument("--partition", default=defaults.partition,
                   help="how the digits are split among the agents: iid or dirichlet:ALPHA")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the split and the model")
    p.add_argument("--clients-per-round", type=int, default=defaults.clients_per_round,
                   help="agents selected per round")
    p.add_argument("--algorithm", default=defaults.algorithm, help="aggregation rule, e.g. fedavg, krum")
    p.add_argument("--algorithm-params", type=json.loads, default={},
                   help="the rule's parameters as a JSON object, Flower's names")
    p.add_argument("--trainer", default=defaults.trainer, choices=["softmax", "mlp"], help="the model")
    p.add_argument("--local-epochs", type=int, default=defaults.local_epochs, help="epochs per task")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="local batch size")
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="local learning rate")
    p.add_argument("--proximal-mu", type=float, default=defaults.proximal_mu,
                   help="FedProx proximal term (0: none)")
    p.add_argument("--privacy-level", default=defaults.privacy_level, choices=["none", "low", "medium", "high"],
                   help="differential privacy of the training")
    p.add_argument("--privacy-mode", default=defaults.privacy_mode, choices=["central", "local"],
                   help="central: the privacy manager noises the aggregate; local: each agent noises its update")
    p.add_argument("--noise-mechanism", default=defaults.noise_mechanism, choices=["gaussian", "laplace"],
                   help="gaussian (L2 clipping, RDP-calibrated) or laplace (L1 clipping, epsilon/rounds per release)")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="pairwise-masked secure aggregation: the server sees only each round's mean")
    p.add_argument("--clip-norm", type=float, default=None, help="L2 bound of each update (agents clip)")
    p.add_argument("--adaptive-clip-quantile", type=float, default=None,
                   help="adaptive clipping towards this quantile of the update norms")
    p.add_argument("--compression", default="none", choices=["none", "top_k", "random_k", "q8", "q4"],
                   help="how agents compress their updates")
    p.add_argument("--compression-fraction", type=float, default=0.1, help="share kept by top_k/random_k")
    p.add_argument("--malicious", type=float, default=0.0, help="fraction of attacking agents")
    p.add_argument("--attack", default="sign_flip", choices=["sign_flip", "gaussian", "label_flip"],
                   help="what the attacking agents do")
    p.add_argument("--timeout", type=float, default=defaults.timeout_s,
                   help="seconds the training may take")
    p.add_argument("--connect-attempts", type=int, default=CONNECT_ATTEMPTS,
                   help="tries to reach the bus, backoff from 0.1 s doubling")
    p.add_argument("--report", type=Path, default=None, metavar="FILE", help="write a JSON report here")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> SimulationOptions:
    settings = load_settings(args.config)
    redis_url, dashboard_url = args.redis_url, args.dashboard_url
    api_key = args.api_key or settings.api_key
    if not (redis_url and dashboard_url and api_key):
        try:
            deployment = read_deployment(settings.data_dir.resolve())
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc}; start one with scripts/deploy-federated-learning.py, "
                                    "or give --redis-url, --dashboard-url and --api-key") from exc
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
        round_deadline_s=settings.round_deadline_s, connect_attempts=args.connect_attempts,
    )


def print_round(row: dict[str, Any]) -> None:
    accuracy = row.get("eval_accuracy")
    loss = row.get("eval_loss")
    print(f"round {row['round']:3d}  accuracy of v{row['eval_of_version']} "
          f"{accuracy if accuracy is None else f'{accuracy:.3f}'}  "
          f"loss {loss if loss is None else f'{loss:.3f}'}  agents {row['participants']}/{row['selected']}  "
          f"{row['round_seconds']:.2f}s", flush=True)


def failure(exc: Exception, options: SimulationOptions) -> str:
    """One line naming why the run could not go on."""
    if isinstance(exc, RedisRefused):
        return f"the deployment's credentials were refused: {exc}"
    if isinstance(exc, TimeoutError):
        return str(exc)
    if isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        if response.status_code in (401, 403):
            return (f"the deployment's credentials were refused: the dashboard at {options.dashboard_url} "
                    f"answered {response.status_code} to the API key ({response.text[:200]})")
        return (f"the dashboard answered {response.status_code} to {exc.request.method} "
                f"{exc.request.url}: {response.text[:200]}")
    if isinstance(exc, httpx.HTTPError):
        return f"cannot reach the dashboard at {options.dashboard_url}: {exc or type(exc).__name__}"
    return f"cannot reach the bus at {redacted(options.redis_url)}: {failure_cause(exc)}"


def simulate(options: SimulationOptions) -> SimulationReport | None:
    """Run the simulation; when the bus or the dashboard fails us, say why in one line, return None."""
    try:
        return asyncio.run(run_simulation(options, on_round=print_round))
    except (RedisConnectionError, RedisTimeoutError, OSError, httpx.HTTPError) as exc:
        print(f"error: {failure(exc, options)}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Each failed try to reach the bus would log a line; the one line below names the cause.
    logging.getLogger("federated_learning.bus.connection").setLevel(logging.ERROR)
    try:
        options = options_from(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{options.clients} agents, {options.partition} split, {options.rounds} rounds of "
          f"{options.algorithm}; dashboard {options.dashboard_url}", flush=True)
    report = simulate(options)
    if report is None:
        return 1
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
