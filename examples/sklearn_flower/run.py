#!/usr/bin/env python3
"""Train an unchanged Flower ``NumPyClient`` (scikit-learn logistic regression, float64 layers)
with 10 agents over the deployed system.

Usage: python3 examples/sklearn_flower/run.py [--agents N] [--rounds N]

The training names no model: as a Flower server without initial parameters does, it takes the
first agent's ``get_parameters`` as version 0 (``"model": {"from_first_agent": true}``). The agents
run with ``python -m agents run --app examples.sklearn_flower.app:make_client``. Ends with
"test accuracy: X.XXX" (the final global model on a test split no agent holds).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bootstrap import ROOT, reexec_in_venv

reexec_in_venv()
sys.path.insert(0, str(ROOT))

import argparse
import os

from examples.harness import agents, deployed, final_model, follow, report_accuracy
from examples.sklearn_flower import app

ROUNDS = 10
TARGET_ACCURACY = 0.90


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=app.DEFAULT_CLIENTS, help="agents (one data shard each)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of FedAvg")
    args = parser.parse_args()
    os.environ["FL_EXAMPLE_CLIENTS"] = str(args.agents)
    with deployed("sklearn_flower") as (deployment, api):
        training_id = api.start_training({
            "name": "sklearn-flower", "dataset": "digits", "rounds": args.rounds,
            "clients_per_round": args.agents, "min_clients": max(2, args.agents // 2),
            "local": {"epochs": app.LOCAL_MAX_ITER}, "privacy_level": "none"}, from_first_agent=True)
        with agents(deployment, "examples.sklearn_flower.app:make_client", "sklearn", args.agents,
                    dataset="digits"):
            status = follow(api, training_id)
        final = final_model(api, training_id, status, who_fixed_the_layout="the first agent")
    return 1 if final is None else report_accuracy(app.test_accuracy(final), TARGET_ACCURACY)


if __name__ == "__main__":
    sys.exit(main())
