#!/usr/bin/env python3
"""Byzantine robustness in the real system: final test accuracy of FedAvg and each robust
rule with 0% and 25% malicious agents, per attack. Deploys its own system on this machine.

Usage: .venv/bin/python scripts/robustness-experiment.py [--rounds 30] [--markdown docs/robustness.md]
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
import os
import shutil
from typing import Any

from agents.simulation import SimulationOptions, run_simulation
from federated_learning.bus.embedded import free_port
from federated_learning.config import load_settings
from federated_learning.deploy.local import LocalDeployment

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data" / "robustness"
CLIENTS_PER_ROUND = 20
# f is what the rule is told to tolerate per round: 25% of 20 selected agents is 5 on average.
RULES: dict[str, dict[str, float | int | str]] = {
    "fedavg": {},
    "krum": {"num_malicious_clients": 5},
    "multikrum": {"num_malicious_clients": 5, "num_clients_to_keep": 10},
    "trimmed_mean": {"beta": 0.3},
    "median": {},
    "bulyan": {"num_malicious_clients": 4},
}
ATTACKS = ("sign_flip", "gaussian", "label_flip")


def run_one(deployment: LocalDeployment, rule: str, malicious: float, attack: str, args: argparse.Namespace) -> float | None:
    options = SimulationOptions(
        redis_url=deployment.redis_url, dashboard_url=deployment.dashboard_url, api_key=deployment.api_key,
        clients=args.clients,
        rounds=args.rounds, partition=args.partition, seed=args.seed, clients_per_round=CLIENTS_PER_ROUND,
        min_clients=CLIENTS_PER_ROUND if rule in ("krum", "multikrum", "bulyan") else None,
        algorithm=rule, algorithm_params=RULES[rule], malicious_fraction=malicious, attack=attack,
        privacy_level="none", state_dir=DATA_DIR / "agent-state",
    )
    report = asyncio.run(run_simulation(options))
    if report.status != "completed":
        print(f"  {rule} {attack} {malicious}: {report.status} {report.reason}", flush=True)
    return report.final_test_accuracy


def markdown(results: dict[str, dict[str, float | None]], args: argparse.Namespace) -> str:
    columns = ["clean", *ATTACKS]
    lines = [
        "# Robustness to malicious agents (measured in the deployed system)", "",
        (f"{args.clients} agents, {args.partition} split, {args.rounds} rounds, {CLIENTS_PER_ROUND} agents per "
        f"round, 25% of agents malicious in the attack columns; final test accuracy of the last "
        f"global model on the held-out test set. Reproduce: `.venv/bin/python "
        f"scripts/robustness-experiment.py --rounds {args.rounds} --seed {args.seed}`."), "",
        "| rule (parameters) | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for rule, row in results.items():
        params = ", ".join(f"{k}={v}" for k, v in RULES[rule].items())
        cells = ["-" if row.get(c) is None else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {rule} ({params}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--clients", type=int, default=69, help="simulated agents")
    p.add_argument("--rounds", type=int, default=30, help="rounds of each training")
    p.add_argument("--partition", default="dirichlet:0.5", help="iid or dirichlet:ALPHA")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the model and the attackers")
    p.add_argument("--rules", nargs="*", default=list(RULES), help="aggregation rules to compare (default: fedavg and every robust rule)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                   help="write the table as Markdown (docs/robustness.md)")
    args = p.parse_args()
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    # Own data folder and free ports, so a running demo or deployment is not disturbed.
    os.environ.update({"FL_DATA_DIR": str(DATA_DIR), "FL_METRICS_PORT_BASE": "0",
                       "FL_DASHBOARD_PORT": str(free_port())})
    settings = load_settings(ROOT / "config.json")
    results: dict[str, dict[str, Any]] = {}
    with LocalDeployment(settings, ROOT / "config.json", DATA_DIR, {"FL_DEFAULT_PRIVACY_LEVEL": "none"}) as deployment:
        for rule in args.rules:
            results[rule] = {"clean": run_one(deployment, rule, 0.0, "sign_flip", args)}
            for attack in ATTACKS:
                results[rule][attack] = run_one(deployment, rule, 0.25, attack, args)
            print(f"{rule:13s} " + "  ".join(f"{k} {v if v is None else f'{v:.3f}'}" for k, v in results[rule].items()),
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
