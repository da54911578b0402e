#!/usr/bin/env python
"""Validate the privacy library against Google's dp-accounting, and time secure aggregation.

Prints three reports:
1. Accountant: epsilon of the Poisson-sampled Gaussian mechanism from our RDP accountant
   and from dp-accounting's RdpAccountant (PoissonSampledDpEvent(q, GaussianDpEvent(z))
   self-composed `steps` times) over a grid of noise multipliers, sample rates, steps and
   deltas, with the relative difference, on dp-accounting's order grid (same math, should
   agree to rounding) and on our finer default grid (never looser).
2. Calibration: our `compute_noise_multiplier` against `dp_accounting.calibrate_dp_mechanism`.
3. Secure aggregation: per-agent masking time and server unmasking time for --agents
   agents with --dim parameters, with 0 and 5 dropouts (skip with --skip-secagg).

4. With --accuracy-cost: the demo (69 agents, Dirichlet 0.5, 20 per round) trained on a
   deployment this script starts (embedded valkey, every service) once per privacy level,
   and each level's final test accuracy and its drop from level 'none'.

Usage:
    .venv/bin/python scripts/validate-privacy.py [--skip-secagg] [--agents 69] \
        [--dim 1000000] [--dropouts 0 5] [--accuracy-cost [--rounds 30]] [--json reports/privacy.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import HelpFormatter, use_venv

use_venv("dp_accounting", extras="test")

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federated_learning.deploy.local import LocalDeployment
from federated_learning.privacy.accountant import (
    DEFAULT_ORDERS,
    DP_ACCOUNTING_DEFAULT_ORDERS,
    compute_noise_multiplier,
    epsilon_from_rdp,
    rdp_sampled_gaussian,
)
from federated_learning.privacy.levels import PrivacyLevel
from federated_learning.privacy.secure_aggregation import measure_secagg_cost

NOISE_MULTIPLIERS = (0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)
SAMPLE_RATES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 1.0)
STEPS = (1, 10, 100, 1000, 10_000)
DELTAS = (1e-5, 1e-6)
PRACTICAL_EPSILON = (0.3, 300.0)
CALIBRATION_CASES = (
    (1.0, 1e-5, 0.01, 1000), (3.0, 1e-5, 0.05, 500), (8.0, 1e-5, 1.0, 100),
    (3.0, 1e-6, 0.001, 10_000), (1.0, 1e-6, 1.0, 50), (8.0, 1e-5, 0.1, 2000),
)


def compare_accountants() -> list[dict[str, float]]:
    """One row per (sigma, q, steps, delta): theirs, ours on their grid and on our grid."""
    rows = []
    for sigma in NOISE_MULTIPLIERS:
        for q in SAMPLE_RATES:
            reference = dp_rdp.RdpAccountant()
            reference.compose(dp_accounting.PoissonSampledDpEvent(
                q, dp_accounting.GaussianDpEvent(sigma)))
            ours_same = rdp_sampled_gaussian(q, sigma, DP_ACCOUNTING_DEFAULT_ORDERS)
            ours_fine = rdp_sampled_gaussian(q, sigma, DEFAULT_ORDERS)
            for steps in STEPS:
                for delta in DELTAS:
                    theirs = dp_rdp.compute_epsilon(
                        DP_ACCOUNTING_DEFAULT_ORDERS, steps * np.asarray(reference.rdp), delta)[0]
                    same = epsilon_from_rdp(DP_ACCOUNTING_DEFAULT_ORDERS, steps * ours_same,
                                            delta)[0]
                    fine = epsilon_from_rdp(DEFAULT_ORDERS, steps * ours_fine, delta)[0]
                    rows.append({"sigma": sigma, "q": q, "steps": steps, "delta": delta,
                                 "theirs": theirs, "ours_same_grid": same, "ours": fine,
                                 "rel_same_grid": (same - theirs) / theirs,
                                 "rel": (fine - theirs) / theirs})
    return rows


def compare_calibration() -> list[dict[str, float]]:
    """Our noise multiplier vs dp_accounting.calibrate_dp_mechanism per case."""
    rows = []
    for epsilon, delta, q, steps in CALIBRATION_CASES:
        def make_event(sigma: float, q: float = q, steps: int = steps) -> dp_accounting.DpEvent:
            return dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps)

        started = time.perf_counter()
        theirs = dp_accounting.calibrate_dp_mechanism(
            dp_rdp.RdpAccountant, make_event, epsilon, delta, tol=1e-6)
        their_seconds = time.perf_counter() - started
        started = time.perf_counter()
        ours = compute_noise_multiplier(epsilon, delta, q, steps)
        our_seconds = time.perf_counter() - started
        rows.append({"epsilon": epsilon, "delta": delta, "q": q, "steps": steps,
                     "theirs": theirs, "ours": ours, "rel": (ours - theirs) / theirs,
                     "their_seconds": their_seconds, "our_seconds": our_seconds})
    return rows


def accuracy_cost_by_level(
    train_and_evaluate: Callable[[PrivacyLevel], float],
    levels: Sequence[PrivacyLevel] = tuple(PrivacyLevel),
) -> dict[str, dict[str, float]]:
    """Hook for the demo: accuracy per privacy level and its drop from level 'none'.

    train_and_evaluate(level) trains the demo at that level and returns test accuracy
    in [0, 1]. Returns {level: {"accuracy": a, "drop_vs_none": a_none - a}}.
    """
    accuracy = {level: float(train_and_evaluate(level)) for level in levels}
    baseline = accuracy.get(PrivacyLevel.NONE)
    return {level.value: {"accuracy": value,
                          "drop_vs_none": (baseline - value) if baseline is not None else
                          float("nan")}
            for level, value in accuracy.items()}


def demo_trainer(deployment: LocalDeployment, rounds: int, state_dir: Path) -> Callable[[PrivacyLevel], float]:
    """train_and_evaluate for accuracy_cost_by_level: the demo's training at one level on a
    running deployment, scored on the test set no agent holds."""
    import asyncio

    from agents.simulation import SimulationOptions, run_simulation

    def train_and_evaluate(level: PrivacyLevel) -> float:
        options = SimulationOptions(
            redis_url=deployment.redis_url, dashboard_url=deployment.dashboard_url,
            api_key=deployment.api_key, key_prefix=deployment.settings.redis_key_prefix,
            rounds=rounds, privacy_level=level.value, state_dir=state_dir)
        report = asyncio.run(run_simulation(options))
        if report.status != "completed" or report.final_test_accuracy is None:
            raise RuntimeError(f"level {level.value}: training {report.status}: {report.reason}")
        print(f"  level {level.value}: final test accuracy {report.final_test_accuracy:.3f} "
              f"({report.seconds:.0f}s)", flush=True)
        return report.final_test_accuracy

    return train_and_evaluate


def measure_accuracy_cost(rounds: int) -> dict[str, dict[str, float]]:
    """Start a deployment in a temporary data folder and run the demo at every level."""
    import tempfile

    from federated_learning.config import load_settings

    config = Path(__file__).resolve().parents[1] / "config.json"
    with tempfile.TemporaryDirectory(prefix="fl-privacy-") as folder:
        deployment = LocalDeployment(load_settings(config), config, Path(folder))
        deployment.start()
        try:
            return accuracy_cost_by_level(demo_trainer(deployment, rounds, Path(folder) / "agent-state"))
        finally:
            deployment.stop()


def _print_accountant(rows: list[dict[str, float]]) -> None:
    print("== accountant: epsilon vs dp-accounting RdpAccountant ==")
    print(f"{'sigma':>5} {'q':>6} {'steps':>6} {'delta':>6} {'theirs':>12} {'ours':>12} "
          f"{'rel diff':>10} {'rel (their grid)':>17}")
    for r in rows:
        print(f"{r['sigma']:5.2f} {r['q']:6.3f} {r['steps']:6d} {r['delta']:6.0e} "
              f"{r['theirs']:12.5g} {r['ours']:12.5g} {r['rel']:10.2e} {r['rel_same_grid']:17.2e}")
    low, high = PRACTICAL_EPSILON
    practical = [r for r in rows if low <= r["theirs"] <= high]
    print(f"rows: {len(rows)}")
    print(f"max |rel diff| on dp-accounting's order grid: "
          f"{max(abs(r['rel_same_grid']) for r in rows):.2e}")
    print(f"max |rel diff| on our default grid, all rows: {max(abs(r['rel']) for r in rows):.2e} "
          f"(ours never larger: {all(r['rel'] <= 1e-12 for r in rows)})")
    print(f"max |rel diff| on our default grid, {low} <= epsilon <= {high} "
          f"({len(practical)} rows): {max(abs(r['rel']) for r in practical):.2e}")


def _print_calibration(rows: list[dict[str, float]]) -> None:
    print("\n== calibration: noise multiplier vs dp_accounting.calibrate_dp_mechanism ==")
    print(f"{'epsilon':>7} {'delta':>6} {'q':>6} {'steps':>6} {'theirs':>10} {'ours':>10} "
          f"{'rel diff':>10} {'their s':>8} {'our s':>7}")
    for r in rows:
        print(f"{r['epsilon']:7.2f} {r['delta']:6.0e} {r['q']:6.3f} {r['steps']:6d} "
              f"{r['theirs']:10.5f} {r['ours']:10.5f} {r['rel']:10.2e} "
              f"{r['their_seconds']:8.2f} {r['our_seconds']:7.2f}")
    print(f"max |rel diff|: {max(abs(r['rel']) for r in rows):.2e}")


def _print_secagg(costs: list[dict[str, Any]]) -> None:
    print("\n== secure aggregation cost ==")
    print(f"{'agents':>6} {'dim':>9} {'t':>3} {'dropouts':>8} {'client share s':>14} "
          f"{'client mask s':>13} {'server unmask s':>15} {'max abs err':>11}")
    for c in costs:
        print(f"{c['num_agents']:6d} {c['vector_length']:9d} {c['threshold']:3d} "
              f"{c['dropouts']:8d} {c['client_share_seconds']:14.4f} "
              f"{c['client_mask_seconds']:13.3f} {c['server_unmask_seconds']:15.3f} "
              f"{c['max_abs_error']:11.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--skip-secagg", action="store_true", help="skip the secure-agg timing")
    parser.add_argument("--agents", type=int, default=69, help="agents of the secure-aggregation timing")
    parser.add_argument("--dim", type=int, default=1_000_000,
                        help="parameters per update in the secure-aggregation timing")
    parser.add_argument("--dropouts", type=int, nargs="+", default=[0, 5],
                        help="agents that drop out, one timing per value")
    parser.add_argument("--accuracy-cost", action="store_true",
                        help="deploy and train the demo at every privacy level (minutes)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of each --accuracy-cost training")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write all rows to this JSON file")
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)

    report: dict[str, Any] = {"accountant": compare_accountants()}
    _print_accountant(report["accountant"])
    report["calibration"] = compare_calibration()
    _print_calibration(report["calibration"])
    if not args.skip_secagg:
        costs = measure_secagg_cost(args.agents, args.dim, args.dropouts)
        report["secure_aggregation"] = [dataclasses.asdict(c) for c in costs]
        _print_secagg(report["secure_aggregation"])
    if args.accuracy_cost:
        print(f"\naccuracy cost per privacy level (demo, {args.rounds} rounds):", flush=True)
        report["accuracy_cost"] = measure_accuracy_cost(args.rounds)
        print(f"{'level':>8} {'accuracy':>9} {'drop vs none':>13}")
        for level, row in report["accuracy_cost"].items():
            print(f"{level:>8} {row['accuracy']:9.3f} {row['drop_vs_none']:13.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
