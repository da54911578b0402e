#!/usr/bin/env python3
"""Federated PatchCore on the digits: 10 agents build one memory bank of normal (0-8) patches,
and the bank finds the 9s that no agent has seen.

Usage: python3 examples/memory_bank_digits/run.py [--agents N] [--bank-size ROWS]

Starts a one-round memory-bank training (``"model": {"kind": "memory_bank", ...}``), runs the
agents with ``python -m agents run --app examples.memory_bank_digits.app:make_trainer`` (each
extracts its patch features and uploads a greedy k-center coreset of them), downloads the
global bank, and scores it on held-out normal digits and every 9 by image-level ROC AUC; then
builds the same-size bank from all agents' patches pooled in this process and scores it too.
Ends with "federated AUROC: X.XXX (central Y.YYY, difference +-Z.ZZZ)", difference = federated
- central; exits 1 when the federated AUROC is below the floor or more than 0.02 under the
pooled bank's.
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

from examples.harness import agents, deployed, final_model, follow
from examples.memory_bank_digits import app
from federated_learning.protocol.messages import BANK_EXAMPLES_LAYER, BANK_LAYER
from federated_learning.rest_client import memory_bank_model

TARGET_AUROC = 0.90
MAX_GAP = 0.02
"""Most the federated bank's AUROC may fall below the pooled bank's."""


def report_auroc(federated: float, central: float) -> int:
    """The example's last line, and its exit code: 0 when the federated bank is good enough."""
    difference = federated - central
    print(f"federated AUROC: {federated:.3f} (central {central:.3f}, difference {difference:+.3f})",
          flush=True)
    return 0 if federated >= TARGET_AUROC and difference >= -MAX_GAP else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=app.DEFAULT_CLIENTS, help="agents (one data shard each)")
    parser.add_argument("--bank-size", type=int, default=app.GLOBAL_BANK_SIZE, help="rows of the global bank")
    args = parser.parse_args()
    os.environ["FL_EXAMPLE_CLIENTS"] = str(args.agents)
    model = memory_bank_model(app.FEATURE_DIM, global_bank_size=args.bank_size,
                              aggregation_strategy=app.AGGREGATION_STRATEGY,
                              local_coreset_fraction=app.LOCAL_CORESET_FRACTION, seed=app.BANK_SEED)
    with deployed("memory_bank_digits") as (deployment, api):
        with agents(deployment, "examples.memory_bank_digits.app:make_trainer", "bank", args.agents,
                    dataset="digits"):
            training_id = api.start_training({
                "name": "memory-bank-digits", "dataset": "digits", "rounds": 1, "model": model,
                "clients_per_round": args.agents, "min_clients": args.agents})
            status = follow(api, training_id)
        final = final_model(api, training_id, status)
    if final is None:
        return 1
    bank = final[BANK_LAYER]
    print(f"global bank: {bank.shape[0]} rows x {bank.shape[1]} from {int(final[BANK_EXAMPLES_LAYER])} "
          f"images of digits 0-8", flush=True)
    return report_auroc(app.test_auroc(bank), app.test_auroc(app.central_bank(bank.shape[0])))


if __name__ == "__main__":
    sys.exit(main())
