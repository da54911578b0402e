#!/usr/bin/env python3
"""The demo: set up .venv, deploy every service on an embedded valkey-server, and train
the digits model with 69 agents on a non-IID (Dirichlet 0.5) split.

Usage: python3 scripts/demo.py [--keep-running] [--rounds N] [--clients N] [--report FILE]

Prints the dashboard URL and where its API key is at start, one line per round, and last
"final test accuracy: X.XXX" (the final global model on a test set no agent holds). The
deployment stops when the training ends; --keep-running keeps it (and the dashboard) up
until Ctrl-C.
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

from cli import HelpFormatter

from agents.simulation import (
    SimulationOptions,
    SimulationReport,
    run_simulation,
    simulated_agent_ids,
)
from federated_learning.config import ConfigError, load_settings
from federated_learning.deploy.launcher import deployment_file
from federated_learning.deploy.local import DeploymentFailed, LocalDeployment, stop_on_sigterm

DEMO_DATA_DIR = Path(os.environ.get("FL_DEMO_DATA_DIR", ROOT / "data" / "demo"))
# Chosen with scripts/tune-demo.py (in-process FedAvg over the same split); 20 agents per
# round is config.json's max_clients_per_round.
DEMO_TRAINING = {"rounds": 30, "clients_per_round": 20, "local_epochs": 10, "batch_size": 4, "learning_rate": 1.0}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--keep-running", action="store_true",
                   help="keep the deployment and its dashboard up after the training, until Ctrl-C")
    p.add_argument("--config", type=Path, default=ROOT / "config.json", metavar="FILE",
                   help="config file (data_dir is always data/demo, or $FL_DEMO_DATA_DIR)")
    p.add_argument("--clients", type=int, default=69, help="simulated agents")
    p.add_argument("--rounds", type=int, default=DEMO_TRAINING["rounds"], help="rounds of FedAvg")
    p.add_argument("--partition", default="dirichlet:0.5",
                   help="how the digits are split among the agents: iid or dirichlet:ALPHA")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the model")
    p.add_argument("--report", type=Path, default=None, metavar="FILE", help="write per-round JSON here")
    return p.parse_args()


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter to read)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_access(deployment: LocalDeployment) -> None:
    key_file = shown(deployment_file(DEMO_DATA_DIR))
    print(f"dashboard: {deployment.dashboard_url}  (API key: \"api_key\" in {key_file}, "
          "while the deployment runs)", flush=True)


def print_round(row: dict[str, object]) -> None:
    acc = row.get("eval_accuracy")
    print(f"round {row['round']:>2}: accuracy of the model sent out {acc:.3f}, "  # type: ignore[str-format]
          f"{row['participants']} agents, {row['round_seconds']:.2f}s", flush=True)


def train(args: argparse.Namespace, deployment: LocalDeployment, prefix: str) -> SimulationReport:
    print(f"{args.clients} agents, {args.partition} split, {args.rounds} rounds of FedAvg, "
          f"{DEMO_TRAINING['clients_per_round']} agents per round", flush=True)
    options = SimulationOptions(
        redis_url=deployment.redis_url, dashboard_url=deployment.dashboard_url, api_key=deployment.api_key,
        key_prefix=prefix, clients=args.clients, rounds=args.rounds,
        partition=args.partition, seed=args.seed,
        clients_per_round=DEMO_TRAINING["clients_per_round"], local_epochs=DEMO_TRAINING["local_epochs"],
        batch_size=DEMO_TRAINING["batch_size"], learning_rate=DEMO_TRAINING["learning_rate"],
        privacy_level="none", state_dir=DEMO_DATA_DIR / "agent-state",
        credentials_dir=deployment.agent_credentials_dir,
    )
    report = asyncio.run(run_simulation(options, on_round=print_round))
    if args.report:
        report.write(args.report)
    print(f"training {report.status} in {report.seconds:.1f}s"
          + (f": {report.reason}" if report.reason else ""), flush=True)
    return report


def succeeded(report: SimulationReport | None) -> bool:
    return report is not None and report.final_test_accuracy is not None and report.status == "completed"


def final_line(report: SimulationReport | None) -> str:
    if not succeeded(report):
        return "final test accuracy: unavailable"
    return f"final test accuracy: {report.final_test_accuracy:.3f}"  # type: ignore[union-attr]


def keep_running(deployment: LocalDeployment, report: SimulationReport) -> None:
    """Leave the deployment up for the dashboard until Ctrl-C (or SIGTERM)."""
    print(final_line(report), flush=True)
    print(f"the deployment keeps running: dashboard {deployment.dashboard_url}, API key in "
          f"{shown(deployment_file(DEMO_DATA_DIR))}; Ctrl-C stops it", flush=True)
    deployment.wait()


def main() -> int:
    args = parse_args()
    shutil.rmtree(DEMO_DATA_DIR, ignore_errors=True)
    os.environ["FL_DATA_DIR"] = str(DEMO_DATA_DIR)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Each simulated agent logs in to Redis as its own user, never with the services' password.
    deployment = LocalDeployment(settings, args.config, DEMO_DATA_DIR,
                                 acl_agents=simulated_agent_ids(args.clients))
    stop_on_sigterm()
    print(f"starting the deployment (logs in {shown(DEMO_DATA_DIR / 'logs')})", flush=True)
    report = None
    try:
        deployment.start()
        print_access(deployment)
        report = train(args, deployment, settings.redis_key_prefix)
        if args.keep_running:
            keep_running(deployment, report)
        else:
            print("stopping the deployment (run with --keep-running to keep it and the dashboard up "
                  "until Ctrl-C)", flush=True)
    except DeploymentFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        deployment.stop()
    if not (args.keep_running and report is not None):
        print(final_line(report), flush=True)
    return 0 if succeeded(report) else 1


if __name__ == "__main__":
    sys.exit(main())
