#!/usr/bin/env python3
"""Train the PyTorch CNN of ``app.py`` with 10 agents over the deployed system.

Usage: python3 examples/pytorch_digits/run.py [--agents N] [--rounds N]

Uploads the model's initial ``state_dict`` (``POST /api/models``), starts a FedAvg training of it,
runs the agents with ``python -m agents run --app examples.pytorch_digits.app:make_trainer``,
and ends with "test accuracy: X.XXX" (the final global model on a test split no agent holds).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bootstrap import ROOT, reexec_in_venv

reexec_in_venv("torch")
sys.path.insert(0, str(ROOT))

import argparse
import os

from examples.harness import agents, deployed, final_model, follow, report_accuracy
from examples.pytorch_digits import app

TARGET_ACCURACY = 0.90


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=app.DEFAULT_CLIENTS, help="agents (one data shard each)")
    parser.add_argument("--rounds", type=int, default=app.ROUNDS, help="rounds of FedAvg")
    args = parser.parse_args()
    os.environ["FL_EXAMPLE_CLIENTS"] = str(args.agents)
    initial = app.make_trainer("torch-0").get_parameters({})
    with deployed("pytorch_digits") as (deployment, api):
        model = api.upload_model(initial, name="digits-cnn")
        print(f"uploaded model {model['model_id']}: {len(model['layers'])} layers, "
              f"{model['parameters']} parameters", flush=True)
        with agents(deployment, "examples.pytorch_digits.app:make_trainer", "torch", args.agents,
                    dataset="digits"):
            training_id = api.start_training({
                "name": "pytorch-digits", "dataset": "digits", "rounds": args.rounds,
                "clients_per_round": args.agents, "min_clients": max(2, args.agents // 2),
                "local": {"epochs": app.LOCAL_EPOCHS, "batch_size": app.BATCH_SIZE,
                          "learning_rate": app.LEARNING_RATE},
                "privacy_level": "none"}, model_id=model["model_id"])
            status = follow(api, training_id)
        final = final_model(api, training_id, status)
    return 1 if final is None else report_accuracy(app.test_accuracy(final), TARGET_ACCURACY)


if __name__ == "__main__":
    sys.exit(main())
