#!/usr/bin/env python3
"""Benchmark the memory-bank library (federated PatchCore, issue 15).

Generates K agent banks of N rows x D features, times merge_banks (greedy k-center coreset,
weighted) down to a global bank, and prints seconds, peak RSS, an extrapolated NumPy
brute-force greedy baseline, coverage radii, and nearest_distances throughput against
NumPy, a Numba kernel and faiss (when importable), with the machine's copy bandwidth and
GEMM rate measured in the same run.

Data: "structured" is what patch features look like (low intrinsic dimension): a mixture
of Gaussian clusters on a low-dimensional subspace embedded in D dimensions plus small
isotropic noise; "noise" is i.i.d. Gaussian noise, the worst case for pruning.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import reexec_in_venv

reexec_in_venv()

import argparse
import os
import platform
import resource
import time
from collections.abc import Callable

import numba
import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from federated_learning.aggregation import configure_threads
from federated_learning.memory_bank import merge_banks, nearest_distances
from federated_learning.memory_bank.coreset import project_into, projection_matrix


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--agents", type=int, default=69, help="number of agent banks K")
    p.add_argument("--rows", type=int, default=10_000, help="rows per agent bank N_i")
    p.add_argument("--dim", type=int, default=512, help="feature width D")
    p.add_argument("--bank-size", type=int, default=10_000, help="global bank rows (target_size)")
    p.add_argument("--data", choices=["structured", "noise", "both"], default="both",
                   help="which feature sets to merge")
    p.add_argument("--clusters", type=int, default=300, help="clusters of the structured data")
    p.add_argument("--subspace", type=int, default=16,
                   help="dimension of the structured data's subspace")
    p.add_argument("--noise", type=float, default=0.05,
                   help="isotropic noise (std per coordinate) of the structured data")
    p.add_argument("--brute-picks", type=int, default=5,
                   help="brute-force greedy picks timed for the extrapolated baseline")
    p.add_argument("--coverage-sample", type=int, default=50_000,
                   help="union rows whose distance to the bank gives the coverage radius")
    p.add_argument("--queries", type=int, default=20_000, help="queries for nearest_distances")
    p.add_argument("--threads", type=int, default=2, help="Numba threads")
    p.add_argument("--seed", type=int, default=0, help="data and merge seed")
    return p.parse_args()


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def structured_banks(args: argparse.Namespace) -> list[NDArray[np.float32]]:
    """Each agent: rows drawn from its own Dirichlet mix of shared clusters on a subspace."""
    rng = np.random.default_rng(args.seed)
    basis = np.linalg.qr(rng.standard_normal((args.dim, args.subspace)))[0].T.astype(np.float32)
    centers = (3.0 * rng.standard_normal((args.clusters, args.subspace))).astype(np.float32)
    banks = []
    for _ in range(args.agents):
        mix = rng.dirichlet(np.full(args.clusters, 0.5))
        labels = rng.choice(args.clusters, size=args.rows, p=mix)
        z = centers[labels] + 0.5 * rng.standard_normal((args.rows, args.subspace), np.float32)
        bank = z @ basis
        bank += args.noise * rng.standard_normal((args.rows, args.dim), np.float32)
        banks.append(bank)
    return banks


def noise_banks(args: argparse.Namespace) -> list[NDArray[np.float32]]:
    rng = np.random.default_rng(args.seed)
    return [rng.standard_normal((args.rows, args.dim), np.float32) for _ in range(args.agents)]


@njit(parallel=True, cache=True)
def parallel_copy(src, dst):  # type: ignore[no-untyped-def]
    for i in prange(src.size):
        dst[i] = src[i]


@njit(parallel=True, cache=True, fastmath=True)
def nearest_sq_numba(bank, queries, out):  # type: ignore[no-untyped-def]
    """The alternative kept out of the library: direct differences, parallel over queries."""
    for q in prange(queries.shape[0]):
        best = np.float32(np.inf)
        for m in range(bank.shape[0]):
            total = np.float32(0.0)
            for c in range(bank.shape[1]):
                t = queries[q, c] - bank[m, c]
                total += t * t
            best = min(best, total)
        out[q] = best


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def copy_bandwidth() -> float:
    """Bytes/s of a Numba-parallel copy of 512 MiB (STREAM copy counting: 2 x bytes)."""
    src = np.ones(128 << 20, np.float32)
    dst = np.empty_like(src)
    parallel_copy(src, dst)
    numba_rate = 2 * src.nbytes / best_of(lambda: parallel_copy(src, dst))
    numpy_rate = 2 * src.nbytes / best_of(lambda: np.copyto(dst, src))
    return max(numba_rate, numpy_rate)


def gemm_rate() -> float:
    a = np.random.default_rng(0).standard_normal((4096, 512)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((512, 4096)).astype(np.float32)
    return 2 * 4096 * 512 * 4096 / best_of(lambda: a @ b)


def brute_force_pick_seconds(banks: list[NDArray[np.float32]], picks: int) -> tuple[float, float]:
    """(seconds to project, seconds per brute-force pick) of the NumPy baseline."""
    width = banks[0].shape[1]
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    projection = projection_matrix(width, 128, rng) if width > 128 else None
    points = np.empty((sum(b.shape[0] for b in banks), min(width, 128)), np.float32)
    top = 0
    for bank in banks:
        project_into(bank, projection, points[top : top + bank.shape[0]])
        top += bank.shape[0]
    project_seconds = time.perf_counter() - started
    min_sq = np.full(points.shape[0], np.inf, np.float32)
    current = 0
    started = time.perf_counter()
    for _ in range(picks):
        np.minimum(min_sq, np.einsum("nd,nd->n", points - points[current], points - points[current]),
                   out=min_sq)
        current = int(np.argmax(min_sq))
    return project_seconds, (time.perf_counter() - started) / picks


def time_merge(name: str, banks: list[NDArray[np.float32]],
               args: argparse.Namespace) -> tuple[str, int, NDArray[np.float32]]:
    """Time and report one merge; return (name, bytes a brute-force greedy reads, the bank)."""
    total = sum(b.shape[0] for b in banks)
    counts = [int(b.shape[0]) * (1 + i % 3) for i, b in enumerate(banks)]
    rss_before = peak_rss_gib()
    started = time.perf_counter()
    merged = merge_banks(banks, counts, args.bank_size, seed=args.seed)
    seconds = time.perf_counter() - started
    rss_after = peak_rss_gib()
    project_s, pick_s = brute_force_pick_seconds(banks, args.brute_picks)
    scan_bytes = args.bank_size * total * min(args.dim, 128) * 4
    print(f"[{name}] merge_banks coreset weighted: {args.agents} x {args.rows} x {args.dim} -> "
          f"{merged.shape[0]} rows in {seconds:.2f} s")
    print(f"[{name}]   peak RSS {rss_before:.2f} GiB before merge (banks held), "
          f"{rss_after:.2f} GiB after (+{rss_after - rss_before:.2f} GiB)")
    print(f"[{name}]   NumPy brute-force greedy, EXTRAPOLATED from {args.brute_picks} picks: "
          f"{project_s + pick_s * args.bank_size:.0f} s ({pick_s * 1e3:.1f} ms/pick x "
          f"{args.bank_size} + {project_s:.2f} s projection)")
    sample = np.random.default_rng(1).choice(total, size=min(args.coverage_sample, total),
                                             replace=False)
    union_sample = np.stack([banks[i // args.rows][i % args.rows] for i in np.sort(sample)])
    random_bank = merge_banks(banks, counts, args.bank_size, method="random", seed=args.seed)
    coreset_radius = float(nearest_distances(merged, union_sample).max())
    random_radius = float(nearest_distances(random_bank, union_sample).max())
    print(f"[{name}]   coverage radius over {sample.size} union rows (D={args.dim}): "
          f"coreset {coreset_radius:.3f}, random {random_radius:.3f}")
    return name, scan_bytes, merged


def report_scoring(bank: NDArray[np.float32], args: argparse.Namespace, gemm: float) -> None:
    rng = np.random.default_rng(2)
    queries = bank[rng.integers(0, bank.shape[0], args.queries)] + rng.standard_normal(
        (args.queries, bank.shape[1]), np.float32)
    flops = 2.0 * args.queries * bank.shape[0] * bank.shape[1]
    ours = best_of(lambda: nearest_distances(bank, queries), 2)
    out = np.empty(1024, np.float32)
    nearest_sq_numba(bank, queries[:16], out[:16])
    numba_s = best_of(lambda: nearest_sq_numba(bank, queries[:1024], out), 2) * args.queries / 1024
    few = queries[:64]
    numpy_s = best_of(lambda: np.sqrt(((few[:, None, :] - bank[None]) ** 2).sum(axis=2)).min(axis=1),
                      1) * args.queries / 64
    print(f"[scoring] nearest_distances {args.queries} queries x bank {bank.shape}: {ours:.2f} s "
          f"= {args.queries / ours:,.0f} queries/s, {flops / ours / 1e9:.0f} GFLOP/s "
          f"(GEMM here {gemm / 1e9:.0f} GFLOP/s)")
    print(f"[scoring]   Numba direct-difference kernel (extrapolated from 1024 queries): "
          f"{numba_s:.2f} s; NumPy broadcast brute force (extrapolated from 64): {numpy_s:.1f} s")
    try:
        import faiss
    except ImportError:
        print("[scoring]   faiss not importable: skipped (pip install faiss-cpu to compare)")
        return
    faiss.omp_set_num_threads(args.threads)
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    faiss_s = best_of(lambda: index.search(queries, 1), 2)
    print(f"[scoring]   faiss-cpu IndexFlatL2 (k=1, {args.threads} threads): {faiss_s:.2f} s")


def main() -> None:
    args = parse_args()
    configure_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__}, numba {numba.__version__}, {args.threads} Numba threads")
    warm = [np.random.default_rng(0).standard_normal((300, args.dim), np.float32)] * 2
    merge_banks(warm, [1, 1], 50)
    merges = []
    for name in (["structured", "noise"] if args.data == "both" else [args.data]):
        banks = structured_banks(args) if name == "structured" else noise_banks(args)
        merges.append(time_merge(name, banks, args))
        del banks
    bandwidth = copy_bandwidth()
    gemm = gemm_rate()
    print(f"limits (measured after the merges, so that they do not raise the peak RSS): copy "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s, float32 GEMM {gemm / 1e9:.0f} GFLOP/s")
    for name, scan_bytes, bank in merges:
        print(f"[{name}]   brute-force memory bound: {scan_bytes / 1e9:.0f} GB read / "
              f"{bandwidth / 1e9:.1f} GB/s = {scan_bytes / bandwidth:.1f} s")
    bank = merges[0][2]
    report_scoring(bank, args, gemm)


if __name__ == "__main__":
    main()
