#!/usr/bin/env python3
"""The demo: set up .venv, deploy every service on an embedded valkey-server, and train
the digits model with 69 agents on a non-IID (Dirichlet 0.5) split.

Usage: python3 scripts/demo.py [--keep-running] [--rounds N] [--clients N] [--report FILE]

Prints the dashboard URL at start, one line per round, and last
"final test accuracy: X.XXX" (the final global model on a test set no agent holds).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import ROOT, reexec_in_venv

reexec_in_venv()

import argparse
import asyncio
import os
import shutil

from agents.simulation import SimulationOptions, run_simulation
from federated_learning.config import ConfigError, load_settings
from federated_learning.deploy.local import DeploymentFailed, LocalDeployment, stop_on_sigterm

DEMO_DATA_DIR = Path(os.environ.get("FL_DEMO_DATA_DIR", ROOT / "data" / "demo"))
# Chosen with scripts/tune-demo.py (in-process FedAvg over the same split); 20 agents per
# round is config.json's max_clients_per_round.
DEMO_TRAINING = {"rounds": 30, "clients_per_round": 20, "local_epochs": 10, "batch_size": 4, "learning_rate": 1.0}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep-running", action="store_true", help="keep the deployment up after training")
    p.add_argument("--config", type=Path, default=ROOT / "config.json")
    p.add_argument("--clients", type=int, default=69)
    p.add_argument("--rounds", type=int, default=DEMO_TRAINING["rounds"])
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, default=None)
    return p.parse_args()


def print_round(row: dict[str, object]) -> None:
    acc = row.get("eval_accuracy")
    print(f"round {row['round']:>2}: accuracy of the model sent out {acc:.3f}, "  # type: ignore[str-format]
          f"{row['participants']} agents, {row['round_seconds']:.2f}s", flush=True)


def main() -> int:
    args = parse_args()
    shutil.rmtree(DEMO_DATA_DIR, ignore_errors=True)
    os.environ["FL_DATA_DIR"] = str(DEMO_DATA_DIR)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    deployment = LocalDeployment(settings, args.config, DEMO_DATA_DIR)
    stop_on_sigterm()
    print(f"starting the deployment (logs in {DEMO_DATA_DIR / 'logs'})", flush=True)
    report = None
    try:
        deployment.start()
        print(f"dashboard: {deployment.dashboard_url}", flush=True)
        print(f"{args.clients} agents, {args.partition} split, {args.rounds} rounds of FedAvg, "
              f"{DEMO_TRAINING['clients_per_round']} agents per round", flush=True)
        options = SimulationOptions(
            redis_url=deployment.redis_url, dashboard_url=deployment.dashboard_url, api_key=deployment.api_key,
            key_prefix=settings.redis_key_prefix, clients=args.clients, rounds=args.rounds,
            partition=args.partition, seed=args.seed,
            clients_per_round=DEMO_TRAINING["clients_per_round"], local_epochs=DEMO_TRAINING["local_epochs"],
            batch_size=DEMO_TRAINING["batch_size"], learning_rate=DEMO_TRAINING["learning_rate"],
            privacy_level="none", state_dir=DEMO_DATA_DIR / "agent-state",
        )
        report = asyncio.run(run_simulation(options, on_round=print_round))
        if args.report:
            report.write(args.report)
        print(f"training {report.status} in {report.seconds:.1f}s"
              + (f": {report.reason}" if report.reason else ""), flush=True)
        if args.keep_running:
            print(f"the deployment keeps running at {deployment.dashboard_url}; Ctrl-C stops it", flush=True)
            deployment.wait()
    except DeploymentFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        deployment.stop()
    if report is None or report.final_test_accuracy is None or report.status != "completed":
        print("final test accuracy: unavailable", flush=True)
        return 1
    print(f"final test accuracy: {report.final_test_accuracy:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
