#!/usr/bin/env python3
"""Five plain-HTTP bots with their own model layout train it over the deployed system.

Usage: python3 examples/http_bot/run.py [--bots N] [--rounds N]

The training names no model (``"from_first_agent": true``): the first bot's ``/sync_model``
fixes the layout. Each bot then trains each new global model on its own data and syncs it
(``bot.py``: JSON over HTTP, nothing else). Ends with "test accuracy: X.XXX" (the final global
model on a test split no bot holds).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bootstrap import ROOT, reexec_in_venv

reexec_in_venv()
sys.path.insert(0, str(ROOT))

import argparse
import threading

import numpy as np

from agents.data import make_client_datasets
from examples.harness import deployed, final_model, follow, report_accuracy
from examples.http_bot.bot import Bot

TARGET_ACCURACY = 0.90


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bots", type=int, default=5, help="bots (one data shard each)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of FedAvg")
    args = parser.parse_args()
    shards, test = make_client_datasets(args.bots, "iid", 0)
    with deployed("http_bot") as (deployment, api):
        training_id = api.start_training({
            "name": "http-bots", "dataset": "digits", "rounds": args.rounds,
            "clients_per_round": args.bots, "min_clients": args.bots, "round_deadline_s": 30,
            "privacy_level": "none"}, from_first_agent=True)
        bots = [Bot(f"bot-{k}", deployment.dashboard_url, deployment.api_key, shard.train.x, shard.train.y,
                    shard.eval.x, shard.eval.y) for k, shard in enumerate(shards)]
        stop = threading.Event()
        threads = [threading.Thread(target=bot.follow, args=(training_id, stop), daemon=True) for bot in bots]
        for thread in threads:
            thread.start()
        try:
            status = follow(api, training_id)
        finally:
            stop.set()
        final = final_model(api, training_id, status, who_fixed_the_layout="the first bot")
    if final is None:
        return 1
    logits = test.x.astype(np.float64) @ final["dense"].astype(np.float64) + final["bias"]
    accuracy = float((logits.argmax(axis=1) == test.y).mean())
    return report_accuracy(accuracy, TARGET_ACCURACY)


if __name__ == "__main__":
    sys.exit(main())
