"""Benchmark the aggregation kernels against NumPy (and Flower, when installed).

For every rule and problem size it reports our time (median of --repeats after a warm-up
call), a plain NumPy baseline, Flower's aggregate function when ``flwr`` imports (one
call, skipped when a 1% probe extrapolates past --skip-flower-above seconds; with the
largest relative difference between its result and ours), the
machine limits measured in the same run (copy bandwidth, float32 GEMM rate), our share
of the limit, and the extra memory of one aggregation call.

Extra memory is measured, not estimated: each rule runs in its own subprocess, which
resets the kernel's peak-RSS counter (``/proc/self/clear_refs``, 5) after filling the
slabs and reads VmHWM after the first full-size call; extra = VmHWM - VmRSS before the
call (the second full-size call, so that optimiser state allocated once is not counted).
Workers run with MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers are returned to the
OS and every call's allocations show up in VmHWM.
It covers NumPy and Numba (NRT) allocations alike, including the output. The NumPy
baselines run with one BLAS thread (OpenBLAS's threads stall when another process holds
a core); the GEMM limit is the better of default and one BLAS thread.

``--inputs arrays`` times the public API as a caller uses it: every client's layers are
separate arrays (one buffer each) handed to ``Strategy.aggregate``; the NumPy baseline is
then ``np.tensordot`` on one slab built after our timings (the client arrays freed first),
and GB/s counts the K d values read once.

Usage (see docs/performance.md):
    .venv/bin/python scripts/benchmark-aggregation.py --d 1000000 10000000 --layers 1 \
        --json reports/aggregation.json
    .venv/bin/python scripts/benchmark-aggregation.py --d 2000000 --layers 1 --inputs arrays \
        --rules fedavg fedadam --no-flower
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import HelpFormatter, use_venv

use_venv()

import argparse
import json
import logging
import os
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numba
import numpy as np
from numba import njit, prange
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federated_learning.aggregation import (
    RULES,
    allocate_slabs,
    configure_threads,
    create_strategy,
)

logger = logging.getLogger("benchmark-aggregation")

COPY_BYTES = 512 * 2**20
GEMM_SHAPE = (69, 2_000_000)
AVERAGING = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedsgd",
    "perffedavg",
    "fedbuff",
)
DISTANCE_RULES = ("krum", "multikrum", "bulyan")
SELECTION_RULES = ("trimmed_mean", "median")
SELECTION_TARGET_S = 1.0
# Flower 1.42's function timed for each rule. FedAvgM and the FedOpt family are timed on
# Flower's averaging step only (their Strategy classes also need serialised FitRes inputs,
# a K x d copy, and add an O(d) optimiser step); FedSGD, PerFedAvg and FedBuff have no
# Flower counterpart here.
FLOWER_FUNCTIONS = {
    "fedavg": "aggregate",
    "fedprox": "aggregate",
    "fedavgm": "aggregate",
    "fedadam": "aggregate",
    "fedyogi": "aggregate",
    "fedadagrad": "aggregate",
    "krum": "aggregate_krum",
    "multikrum": "aggregate_krum",
    "trimmed_mean": "aggregate_trimmed_avg",
    "median": "aggregate_median",
    "bulyan": "aggregate_bulyan",
}
# Every allocation of 64 KiB or more gets its own mmap and is unmapped when freed, so
# VmHWM sees each call's buffers instead of heap memory kept from the warm-up call.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


@njit(parallel=True, cache=True)
def parallel_copy(source, target):  # type: ignore[no-untyped-def]
    """target[:] = source[:] in 64 Ki-element blocks spread over the Numba threads."""
    n = source.size
    for b in prange((n + 65535) // 65536):
        for i in range(b * 65536, min(n, (b + 1) * 65536)):
            target[i] = source[i]


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` calls after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(repeats: int) -> dict[str, float]:
    """STREAM-copy bandwidth in bytes/s: 2 x bytes / time, Numba parallel and np.copyto."""
    source = np.ones(COPY_BYTES // 4, dtype=np.float32)
    target = np.zeros_like(source)
    numba_bw = 2 * COPY_BYTES / best_time(lambda: parallel_copy(source, target), repeats)
    numpy_bw = 2 * COPY_BYTES / best_time(lambda: np.copyto(target, source), repeats)
    return {
        "numba_copy_Bps": numba_bw,
        "numpy_copy_Bps": numpy_bw,
        "bandwidth_Bps": max(numba_bw, numpy_bw),
    }


def gemm_rate(repeats: int) -> dict[str, float]:
    """float32 X @ X.T rate in FLOP/s for X of GEMM_SHAPE, BLAS default threads and 1 thread."""
    x = np.random.default_rng(0).standard_normal(GEMM_SHAPE, dtype=np.float32)
    flops = 2.0 * GEMM_SHAPE[0] ** 2 * GEMM_SHAPE[1]
    default = flops / best_time(lambda: x @ x.T, repeats)
    with threadpool_limits(limits=1, user_api="blas"):
        single = flops / best_time(lambda: x @ x.T, repeats)
    return {
        "gemm_default_threads_flops": default,
        "gemm_1_thread_flops": single,
        "gemm_flops": max(default, single),
    }


def rule_params(rule: str, num_clients: int) -> dict[str, Any]:
    """Benchmark hyperparameters: f = 25% for Krum, the largest legal f for Bulyan."""
    params: dict[str, dict[str, Any]] = {
        "fedprox": {"proximal_mu": 0.01},
        "fedavgm": {"server_momentum": 0.9},
        "fedbuff": {"buffer_size": num_clients},
        "krum": {"num_malicious_clients": num_clients // 4},
        "multikrum": {"num_malicious_clients": num_clients // 4},
        "bulyan": {"num_malicious_clients": (num_clients - 3) // 4},
        "trimmed_mean": {"beta": 0.2},
    }
    return params.get(rule, {})


def make_round(
    d: int, num_layers: int, num_clients: int, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Global layers and filled float32 slabs: global + 0.1 * N(0, 1) per client, no temporaries."""
    global_layers = make_global(d, num_layers, np.random.default_rng(seed))
    slabs = allocate_slabs(global_layers, num_clients)
    fill_updates(global_layers, [list(slab) for slab in slabs], np.random.default_rng(seed + 1))
    return global_layers, slabs


def make_client_arrays(
    d: int, num_layers: int, num_clients: int, seed: int = 0
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """The same round as ``make_round`` with the same values, but each client's layer in a
    buffer of its own: ``clients[k][i]``."""
    global_layers = make_global(d, num_layers, np.random.default_rng(seed))
    clients = [[np.empty_like(layer) for layer in global_layers] for _ in range(num_clients)]
    by_layer = [[client[i] for client in clients] for i in range(num_layers)]
    fill_updates(global_layers, by_layer, np.random.default_rng(seed + 1))
    return global_layers, clients


def make_global(d: int, num_layers: int, rng: np.random.Generator) -> list[np.ndarray]:
    """d float32 N(0, 1) values split into num_layers layers."""
    sizes = [d // num_layers + (1 if i < d % num_layers else 0) for i in range(num_layers)]
    return [rng.standard_normal(size, dtype=np.float32) for size in sizes]


def fill_updates(
    global_layers: list[np.ndarray], by_layer: list[list[np.ndarray]], rng: np.random.Generator
) -> None:
    """by_layer[i][k] = global layer i + 0.1 N(0, 1), filled layer by layer, client by client."""
    for layer, updates in zip(global_layers, by_layer, strict=True):
        for update in updates:
            rng.standard_normal(dtype=np.float32, out=update)
            update *= np.float32(0.1)
            update += layer


def numpy_baseline(
    rule: str, slabs: list[np.ndarray], weights: np.ndarray, params: dict[str, Any]
) -> Callable[[], object]:
    """Plain NumPy version of the rule's dominant work."""
    w32 = weights.astype(np.float32)
    if rule in AVERAGING:
        return lambda: [np.tensordot(w32, slab, axes=1) for slab in slabs]
    if rule in DISTANCE_RULES:

        def gram_distances() -> np.ndarray:
            gram = sum(slab @ slab.T for slab in slabs)
            norms = np.diag(gram)
            return np.asarray(norms[:, None] + norms[None, :] - 2 * gram)

        return gram_distances
    if rule == "median":
        return lambda: [np.median(slab, axis=0) for slab in slabs]
    cut = int(params["beta"] * slabs[0].shape[0])
    hi = slabs[0].shape[0] - cut
    return lambda: [
        np.partition(slab, (cut, hi - 1), axis=0)[cut:hi].mean(axis=0) for slab in slabs
    ]


def import_flower_aggregate() -> ModuleType | None:
    """``flwr.server.strategy.aggregate``, or None without flwr (its imports warn; ignored)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from flwr.server.strategy import aggregate as flwr_aggregate
        except ImportError:
            return None
    return flwr_aggregate


def flower_call(
    rule: str,
    clients: list[list[np.ndarray]],
    counts: list[int],
    params: dict[str, Any],
    columns: list[int] | None = None,
) -> Callable[[], list[np.ndarray]] | None:
    """Flower's function for the rule (FLOWER_FUNCTIONS) on the clients' layers (slab rows or
    separate arrays).

    columns: how many leading coordinates of each layer to pass (all when None); used to
    time a small probe before deciding whether the full call fits --skip-flower-above.
    """
    module = import_flower_aggregate()
    if module is None or rule not in FLOWER_FUNCTIONS:
        return None
    widths = columns or [layer.size for layer in clients[0]]

    def results() -> list[tuple[list[np.ndarray], int]]:
        return [
            ([layer[:width] for layer, width in zip(layers, widths, strict=True)], n)
            for layers, n in zip(clients, counts, strict=True)
        ]

    f = params.get("num_malicious_clients", 0)
    calls: dict[str, Callable[[], list[np.ndarray]]] = {
        "aggregate": lambda: module.aggregate(results()),
        "aggregate_median": lambda: module.aggregate_median(results()),
        "aggregate_trimmed_avg": lambda: module.aggregate_trimmed_avg(
            results(), params.get("beta", 0.0)
        ),
        "aggregate_bulyan": lambda: module.aggregate_bulyan(
            results(), f, module.aggregate_krum, to_keep=0
        ),
    }
    if rule == "krum":
        return lambda: module.aggregate_krum(results(), f, 0)
    if rule == "multikrum":
        return lambda: module.aggregate_krum(results(), f, len(counts) - f)
    return calls[FLOWER_FUNCTIONS[rule]]


def normwise_difference(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    """max |ours - theirs| / max |theirs| over all coordinates (float32 rounding: ~1e-7)."""
    gap, scale = 0.0, 0.0
    for a, b in zip(ours, theirs, strict=True):
        reference = np.asarray(b, dtype=np.float64).reshape(-1)
        gap = max(gap, float(np.max(np.abs(np.asarray(a, np.float64).reshape(-1) - reference))))
        scale = max(scale, float(np.max(np.abs(reference))))
    return gap / scale if scale > 0.0 else gap


def time_flower(
    rule: str,
    clients: list[list[np.ndarray]],
    counts: list[int],
    params: dict[str, Any],
    skip_above_s: float,
    ours: list[np.ndarray],
) -> dict[str, Any]:
    """Flower's time for the rule, or why not: probe 1% of the coordinates, extrapolate
    linearly (every Flower function here is linear in d), run the full call only when the
    estimate is at most ``skip_above_s``. Also how far our result is from Flower's."""
    none: dict[str, Any] = {"flower_s": None, "flower_estimate_s": None, "flower_vs_ours": None}
    sizes = [layer.size for layer in clients[0]]
    probe_columns = [min(size, max(4096, size // 100)) for size in sizes]
    probe = flower_call(rule, clients, counts, params, probe_columns)
    if probe is None:
        return none
    start = time.perf_counter()
    probe()
    scale = sum(sizes) / sum(probe_columns)
    estimate = (time.perf_counter() - start) * scale
    if estimate > skip_above_s:
        return {**none, "flower_estimate_s": estimate}
    full = flower_call(rule, clients, counts, params)
    assert full is not None
    start = time.perf_counter()
    theirs = full()
    elapsed = time.perf_counter() - start
    same_rule = FLOWER_FUNCTIONS[rule] != "aggregate" or rule in ("fedavg", "fedprox")
    return {
        "flower_s": elapsed,
        "flower_estimate_s": estimate,
        "flower_vs_ours": normwise_difference(ours, theirs) if same_rule else None,
    }


def read_status_kib(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls."""
    return median_times(fn, repeats)[0]


def median_times(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process-CPU seconds (all threads) of ``repeats`` calls.

    CPU time near wall time x threads means the threads had their cores; CPU time near
    wall time means they waited on one another (another process held a core).
    """
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return statistics.median(walls), statistics.median(cpus)


def round_call(
    spec: dict[str, Any],
    d: int,
    seed: int,
    strategy: Any,
    counts: list[int],
    kwargs: dict[str, Any],
) -> tuple[Callable[[], list[np.ndarray]], list[list[np.ndarray]]]:
    """One aggregation call on a fresh round of size d (``spec['inputs']``: slabs through
    ``aggregate_slabs``, or separate client arrays through ``aggregate``), and the clients'
    layers it reads (slab rows or the arrays)."""
    num_layers, num_clients = spec["layers"], spec["clients"]
    if spec["inputs"] == "arrays":
        global_layers, clients = make_client_arrays(d, num_layers, num_clients, seed)
        return lambda: strategy.aggregate(global_layers, clients, counts, **kwargs), clients
    global_layers, slabs = make_round(d, num_layers, num_clients, seed)
    clients = [[slab[k] for slab in slabs] for k in range(num_clients)]
    return lambda: strategy.aggregate_slabs(global_layers, slabs, counts, **kwargs), clients


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One rule at one size, in this (fresh) process: memory first, then timings."""
    rule, d, num_layers, num_clients = spec["rule"], spec["d"], spec["layers"], spec["clients"]
    if spec["threads"]:
        configure_threads(spec["threads"])
    params = rule_params(rule, num_clients)
    counts = [100 + k for k in range(num_clients)]
    kwargs: dict[str, Any] = {
        "client_metrics": [{"accuracy": 0.5 + 0.005 * k} for k in range(num_clients)]
    }
    small = 4096 * num_layers
    warm_up, _ = round_call(spec, small, 1, create_strategy(rule, **params), counts, kwargs)
    warm_up()
    call, clients = round_call(spec, d, 0, create_strategy(rule, **params), counts, kwargs)
    start = time.perf_counter()
    call()
    first_call = time.perf_counter() - start
    Path("/proc/self/clear_refs").write_text("5")
    rss_before = read_status_kib("VmRSS")
    result = call()
    extra_bytes = (read_status_kib("VmHWM") - rss_before) * 1024
    ours, ours_cpu = median_times(call, spec["repeats"])
    flower = {"flower_s": None, "flower_estimate_s": None, "flower_vs_ours": None}
    if spec["flower"]:
        flower = time_flower(rule, clients, counts, params, spec["skip_flower_above"], result)
    del call, clients
    numpy_s = None
    if spec["baseline_repeats"]:
        _, slabs = make_round(d, num_layers, num_clients)
        weights = np.asarray(counts, dtype=np.float64) / sum(counts)
        baseline_fn = numpy_baseline(rule, slabs, weights, params)
        # One BLAS thread: OpenBLAS's threads stall when another process holds a core.
        with threadpool_limits(limits=1, user_api="blas"):
            numpy_s = median_time(baseline_fn, spec["baseline_repeats"])
    return {
        "rule": rule,
        "d": d,
        "layers": num_layers,
        "clients": num_clients,
        "inputs": spec["inputs"],
        "params": params,
        "ours_s": ours,
        "ours_cpu_s": ours_cpu,
        "first_call_s": first_call,
        "numpy_s": numpy_s,
        **flower,
        "flower_function": FLOWER_FUNCTIONS.get(rule),
        "extra_bytes": extra_bytes,
    }


def limit_seconds(rule: str, d: int, num_clients: int, limits: dict[str, float]) -> float:
    """FedAvg limit = K d 4 B / bandwidth; distance rules: max(that, 2 K^2 d / GEMM rate)."""
    read_once = num_clients * d * 4 / limits["bandwidth_Bps"]
    if rule in DISTANCE_RULES:
        return max(read_once, 2.0 * num_clients**2 * d / limits["gemm_flops"])
    return read_once


def verdict(row: dict[str, Any]) -> str:
    """Against docs' targets: averaging >= 85% of limit, Krum >= 70%, selection <= 1 s."""
    memory_ok = row["extra_bytes"] <= row["memory_budget_bytes"]
    if row["rule"] in SELECTION_RULES:
        time_ok = row["ours_s"] <= SELECTION_TARGET_S * row["d"] / 10_000_000
    elif row["rule"] in ("krum", "multikrum"):
        time_ok = row["pct_of_limit"] >= 70.0
    elif row["rule"] == "bulyan":
        time_ok = True
    else:
        time_ok = row["pct_of_limit"] >= 85.0
    return ("ok" if time_ok else "slow") + ("" if memory_ok else ", mem")


def flower_cell(row: dict[str, Any]) -> str:
    """Flower's seconds, 'skipped (est. N s)' when over --skip-flower-above, or '-'."""
    if row["flower_s"] is not None:
        return f"{row['flower_s']:.3f}"
    if row["flower_estimate_s"] is not None:
        return f"skipped (est. {row['flower_estimate_s']:.0f} s)"
    return "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the results, then which Flower function each rule was timed on."""
    header = (
        "| d | layers | inputs | rule | ours (s) | ours CPU (s) | GB/s | NumPy (s) | NumPy/ours "
        "| Flower (s) | Flower/ours | diff vs Flower | limit (s) | % of limit | extra MB "
        "| budget MB | target |"
    )
    lines = [header, "|" + "---|" * 17]
    for r in rows:
        numpy_s = f"{r['numpy_s']:.3f}" if r["numpy_s"] is not None else "-"
        vs_numpy = f"{r['numpy_s'] / r['ours_s']:.2f}" if r["numpy_s"] is not None else "-"
        read_rate = r["clients"] * r["d"] * 4 / r["ours_s"] / 1e9
        ratio = f"{r['flower_s'] / r['ours_s']:.0f}x" if r["flower_s"] is not None else "-"
        diff = f"{r['flower_vs_ours']:.1e}" if r["flower_vs_ours"] is not None else "-"
        lines.append(
            f"| {r['d']:,} | {r['layers']} | {r['inputs']} | {r['rule']} | {r['ours_s']:.4f} "
            f"| {r['ours_cpu_s']:.4f} | {read_rate:.1f} | {numpy_s} | {vs_numpy} "
            f"| {flower_cell(r)} | {ratio} | {diff} "
            f"| {r['limit_s']:.4f} | {r['pct_of_limit']:.0f}% | {r['extra_bytes'] / 1e6:.2f} "
            f"| {r['memory_budget_bytes'] / 1e6:.2f} | {r['verdict']} |"
        )
    timed = sorted({f"{r['rule']}: {r['flower_function']}" for r in rows if r["flower_function"]})
    if timed:
        lines.append("")
        lines.append("Flower functions timed (flwr.server.strategy.aggregate): " + ", ".join(timed))
        lines.append("diff vs Flower: max |ours - Flower| / max |Flower| over the model.")
        lines.append(
            "FedAvgM/FedAdam/FedYogi/FedAdagrad: Flower's averaging step only. "
            "Skipped: Flower's time estimated from 1% of the coordinates exceeded "
            "--skip-flower-above."
        )
    lines.append("")
    lines.append(
        "GB/s: K d 4 bytes (every update read once) / ours; NumPy/ours: the NumPy "
        "baseline's time over ours (np.tensordot on one slab for the averaging rules)."
    )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--d", type=int, nargs="+", default=[1_000_000, 10_000_000],
                        help="parameters per client update (one run per value)")
    parser.add_argument("--clients", type=int, default=69, help="client updates aggregated (K)")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 8],
                        help="layers the d parameters are split into (one run per value)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES), metavar="RULE",
                        help=f"aggregation rules to time, of: {', '.join(RULES)} (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of our kernels (median)")
    parser.add_argument("--baseline-repeats", type=int, default=1,
                        help="timed calls of the NumPy baseline (0: skip it)")
    parser.add_argument("--threads", type=int, default=0, help="Numba threads; 0 = all")
    parser.add_argument("--inputs", choices=("slabs", "arrays"), default="slabs",
                        help="slabs: one (K, d_i) slab per layer through aggregate_slabs (the "
                        "service's path); arrays: each client's layers in buffers of their own "
                        "through the public aggregate")
    parser.add_argument("--no-flower", action="store_true", help="skip Flower even if installed")
    parser.add_argument(
        "--skip-flower-above",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="skip a Flower call whose time, extrapolated from 1%% of the coordinates, "
        "exceeds this",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        configure_threads(args.threads)
    load_before = os.getloadavg()
    limits = {**copy_bandwidth(args.repeats), **gemm_rate(3)}
    logger.info("limits: %s", {k: f"{v:.3g}" for k, v in limits.items()})
    rows = []
    for d in args.d:
        for num_layers in args.layers:
            for rule in args.rules:
                spec = {
                    "rule": rule,
                    "d": d,
                    "layers": num_layers,
                    "clients": args.clients,
                    "repeats": args.repeats,
                    "baseline_repeats": args.baseline_repeats,
                    "threads": args.threads,
                    "inputs": args.inputs,
                    "flower": not args.no_flower,
                    "skip_flower_above": args.skip_flower_above,
                }
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(spec)],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=WORKER_ENV,
                )
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["limit_s"] = limit_seconds(rule, d, args.clients, limits)
                row["pct_of_limit"] = 100.0 * row["limit_s"] / row["ours_s"]
                row["memory_budget_bytes"] = d * 4 + args.clients**2 * 8
                row["verdict"] = verdict(row)
                logger.info(
                    "d=%s layers=%s inputs=%s rule=%s ours=%.4fs numpy=%s flower=%s extra=%.1fMB",
                    d,
                    num_layers,
                    args.inputs,
                    rule,
                    row["ours_s"],
                    row["numpy_s"],
                    flower_cell(row),
                    row["extra_bytes"] / 1e6,
                )
                rows.append(row)
    context = {
        "numba_threads": numba.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    table = format_table(rows)
    sys.stdout.write(f"limits: {json.dumps(limits)}\ncontext: {json.dumps(context)}\n{table}\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"limits": limits, "context": context, "argv": sys.argv, "rows": rows}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
