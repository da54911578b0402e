#!/usr/bin/env python3
"""Stress the aggregator workers of a deployed system with concurrent trainings' jobs.

Deploys the system in data/stress (fresh) with --workers aggregator processes, uploads a
base model and --clients update blobs (float32, one layer of --dim, fixed seeds), then runs
--concurrent simulated trainings at once: round r of a training is published on the job
stream as soon as its round r-1 result is on the aggregate stream (the result's model and
state become the next base), so --concurrent jobs are in the group at any time. The
coordinator, agents and privacy manager play no part (the privacy manager rejects the
aggregates of these unknown trainings; that is expected).

With --kill-worker one aggregator worker is SIGKILLed while it holds a job (pid from
/api/system/health, the job from XPENDING); the supervisor restarts it and its job is
redone, by the same consumer on restart or by another worker's XAUTOCLAIM after
claim_idle_ms (2000 here).

Checks: every job has a result (none lost); every result of a job key has the same model
digest; sampled results equal a NumPy weighted mean (fedavg only). Duplicates (job keys
with more than one result) are counted, not failed: delivery is at least once.
Latency is measured on the server clock: from the job's stream entry id to the entry id
of its first AggregateReady (1 ms resolution). Exit status 1 when a job is lost, results
differ, a reference check fails or the killed worker did not come back.

Kernels compiled by earlier runs are reused from data/numba-cache ($NUMBA_CACHE_DIR wins),
so the fresh deployment does not spend its start-up compiling.

Usage: .venv/bin/python scripts/stress-test-aggregation.py --concurrent 10 [--workers 2]
    [--rounds 5] [--clients 20] [--dim 100000] [--algorithm fedavg] [--kill-worker] [--json FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import HelpFormatter, use_venv

use_venv()

import argparse
import asyncio
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import redis.asyncio as aioredis
from numpy.typing import NDArray

from federated_learning.aggregation import RULES, create_strategy
from federated_learning.bus.blob_stores import services_blob_store
from federated_learning.bus.blobs import BlobStore
from federated_learning.bus.connection import connect
from federated_learning.config import ConfigError, Settings, load_settings
from federated_learning.deploy.local import DeploymentFailed, LocalDeployment
from federated_learning.protocol.keys import GROUP_AGGREGATOR, Keys
from federated_learning.protocol.messages import (
    AggregateReady,
    AggregationJob,
    MalformedMessage,
    UpdateRef,
    decode,
    encode,
)
from federated_learning.protocol.tensors import decode_layers, encode_layers

log = logging.getLogger("stress-test-aggregation")

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data" / "stress"
NUMBA_CACHE_DIR = ROOT / "data" / "numba-cache"
LAYER = "weight"
CLAIM_IDLE_MS = 2000
READ_BLOCK_MS = 500
PAGE = 1000
KILL_FIND_TIMEOUT_S = 20.0
RESTART_TIMEOUT_S = 90.0
DRAIN_TIMEOUT_S = 60.0
HEALTH_POLL_S = 0.5
REFERENCE_RULES = ("fedavg",)
REFERENCE_RTOL = 1e-6
REFERENCE_ATOL = 1e-7


@dataclass
class Plan:
    """What every job is built from: blobs already uploaded, and the arrays behind them."""

    base_digest: str
    client_digests: list[str]
    clients: NDArray[np.float32]
    """(clients, dim) float32: row k is the update stored under ``client_digests[k]``."""


@dataclass
class Tracker:
    """Jobs published and the first result seen for each (others are counted at the end)."""

    job_entries: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, AggregationJob] = field(default_factory=dict)
    first: dict[str, asyncio.Future[AggregateReady]] = field(default_factory=dict)
    entry_to_key: dict[bytes, str] = field(default_factory=dict)

    def waiter(self, key: str) -> asyncio.Future[AggregateReady]:
        if key not in self.first:
            self.first[key] = asyncio.get_running_loop().create_future()
        return self.first[key]

    @property
    def results_seen(self) -> int:
        return sum(1 for f in self.first.values() if f.done())


@dataclass
class KillReport:
    consumer: str = ""
    pid: int = 0
    held_jobs: list[str] = field(default_factory=list)
    restarted_pid: int | None = None
    restart_s: float | None = None
    error: str = ""


def job_key_of(ready: AggregateReady) -> str:
    return f"{ready.training_id}/{ready.round}/{ready.attempt}"


def as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def entry_ms(entry_id: bytes) -> int:
    """Server time (unix ms) at which a stream entry was added, from its id."""
    return int(entry_id.split(b"-")[0])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client_updates(clients: int, dim: int, seed: int) -> NDArray[np.float32]:
    """(clients, dim) float32 updates; row k is drawn from N(0, 1) with seed (seed, k)."""
    rows = [np.random.default_rng((seed, k)).standard_normal(dim, dtype=np.float32)
            for k in range(clients)]
    return np.stack(rows)


def example_counts(seed: int, training: int, round_number: int, clients: int) -> list[int]:
    """Examples per client for one job, in [10, 1000), fixed by (seed, training, round)."""
    rng = np.random.default_rng((seed, 1_000_003, training, round_number))
    return [int(n) for n in rng.integers(10, 1000, size=clients)]


def weighted_mean(clients: NDArray[np.float32], counts: list[int]) -> NDArray[np.float32]:
    """FedAvg reference: sum_k (n_k / sum n) w_k, in float64, rounded to float32 once."""
    weights = np.asarray(counts, np.float64) / float(sum(counts))
    return np.asarray(weights @ clients.astype(np.float64), dtype=np.float32)


async def upload(blobs: BlobStore, args: argparse.Namespace) -> Plan:
    clients = client_updates(args.clients, args.dim, args.seed)
    base = np.random.default_rng((args.seed, 999_983)).standard_normal(args.dim, dtype=np.float32)
    base_digest = await blobs.put(encode_layers({LAYER: base}))
    digests = [await blobs.put(encode_layers({LAYER: row}), owner=client_id(k)) for k, row in enumerate(clients)]
    return Plan(base_digest=base_digest, client_digests=digests, clients=clients)


def client_id(k: int) -> str:
    return f"client-{k:03d}"


def training_name(training: int) -> str:
    return f"stress-{training:03d}"


def build_job(args: argparse.Namespace, plan: Plan, training: int, round_number: int,
              base_digest: str, state_digest: str | None) -> AggregationJob:
    counts = example_counts(args.seed, training, round_number, args.clients)
    updates = [UpdateRef(agent_id=client_id(k), digest=digest, num_examples=n)
               for k, (digest, n) in enumerate(zip(plan.client_digests, counts, strict=True))]
    return AggregationJob(
        training_id=training_name(training), round=round_number, attempt=1,
        algorithm=args.algorithm, base_version=round_number - 1, base_digest=base_digest,
        state_digest=state_digest, updates=updates,
    )


async def run_training(redis: aioredis.Redis, keys: Keys, tracker: Tracker, plan: Plan,
                       args: argparse.Namespace, training: int) -> None:
    """Publish rounds 1..rounds, each once the previous round's first result is in."""
    base_digest, state_digest = plan.base_digest, None
    for round_number in range(1, args.rounds + 1):
        job = build_job(args, plan, training, round_number, base_digest, state_digest)
        waiter = tracker.waiter(job.job_key)
        entry = as_bytes(await redis.xadd(keys.job_stream, encode(job)))  # type: ignore[arg-type]
        tracker.job_entries[job.job_key] = entry
        tracker.jobs[job.job_key] = job
        tracker.entry_to_key[entry] = job.job_key
        try:
            ready = await asyncio.wait_for(asyncio.shield(waiter), args.job_timeout_s)
        except TimeoutError:
            log.error("job %s: no result within %gs; training %s stops here",
                      job.job_key, args.job_timeout_s, job.training_id)
            return
        base_digest, state_digest = ready.model_digest, ready.state_digest


async def follow_results(redis: aioredis.Redis, keys: Keys, tracker: Tracker, stop: asyncio.Event) -> None:
    """Tail the aggregate stream (XREAD, no group) and resolve each job's first result."""
    last_id: bytes | str = "0-0"
    while not stop.is_set():
        reply: Any = await redis.xread({keys.aggregate_stream: last_id}, count=PAGE,
                                       block=READ_BLOCK_MS)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id
                try:
                    ready = decode(AggregateReady, fields)
                except MalformedMessage:
                    continue
                waiter = tracker.waiter(job_key_of(ready))
                if not waiter.done():
                    waiter.set_result(ready)


async def aggregator_pids(http: httpx.AsyncClient) -> dict[str, int]:
    """Consumer name (``aggregator-<instance>``) -> pid, from /api/system/health."""
    health = (await http.get("/api/system/health")).json()
    return {f"aggregator-{rec['instance']}": int(rec["pid"])
            for rec in health["services"].get("aggregator", [])}


async def pending_by_consumer(redis: aioredis.Redis, keys: Keys) -> dict[str, list[bytes]]:
    """Job-stream entry ids pending in the aggregator group, by consumer name."""
    rows: list[dict[str, Any]] = await redis.xpending_range(
        keys.job_stream, GROUP_AGGREGATOR, min="-", max="+", count=PAGE)
    held: dict[str, list[bytes]] = {}
    for row in rows:
        consumer = row["consumer"].decode() if isinstance(row["consumer"], bytes) else row["consumer"]
        held.setdefault(consumer, []).append(row["message_id"])
    return held


async def kill_busy_worker(redis: aioredis.Redis, keys: Keys, http: httpx.AsyncClient,
                           tracker: Tracker, report: KillReport, after_results: int,
                           trainings_done: asyncio.Event) -> None:
    """Once ``after_results`` jobs are done, SIGKILL a worker that holds a job; await its restart."""
    while tracker.results_seen < after_results and not trainings_done.is_set():
        await asyncio.sleep(0.01)
    pids = await aggregator_pids(http)
    deadline = time.monotonic() + KILL_FIND_TIMEOUT_S
    while time.monotonic() < deadline and not trainings_done.is_set():
        busy = {c: ids for c, ids in (await pending_by_consumer(redis, keys)).items() if c in pids}
        if busy:
            report.consumer = min(busy)
            report.pid = pids[report.consumer]
            os.kill(report.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            held = (await pending_by_consumer(redis, keys)).get(report.consumer, [])
            report.held_jobs = [tracker.entry_to_key.get(e, e.decode()) for e in held]
            log.info("killed %s (pid %d) holding %s", report.consumer, report.pid, report.held_jobs)
            await await_restart(http, report, killed_at)
            return
        await asyncio.sleep(0.002)
    report.error = "no aggregator worker held a job while the trainings ran"


async def await_restart(http: httpx.AsyncClient, report: KillReport, killed_at: float) -> None:
    """Poll the health report until the killed consumer shows a new pid."""
    while time.monotonic() - killed_at < RESTART_TIMEOUT_S:
        pid = (await aggregator_pids(http)).get(report.consumer)
        if pid is not None and pid != report.pid:
            report.restarted_pid, report.restart_s = pid, time.monotonic() - killed_at
            log.info("%s is back as pid %d after %.1fs", report.consumer, pid, report.restart_s)
            return
        await asyncio.sleep(HEALTH_POLL_S)
    report.error = f"{report.consumer} did not come back within {RESTART_TIMEOUT_S:.0f}s"


async def wait_drained(redis: aioredis.Redis, keys: Keys) -> int:
    """Wait (bounded) until the aggregator group has no pending job; return what is left."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        pending = int((await redis.xpending(keys.job_stream, GROUP_AGGREGATOR))["pending"])
        if pending == 0 or time.monotonic() > deadline:
            return pending
        await asyncio.sleep(0.2)


async def all_results(redis: aioredis.Redis, keys: Keys) -> dict[str, list[tuple[bytes, AggregateReady]]]:
    """Every AggregateReady on the aggregate stream (XRANGE), by job key, in stream order."""
    results: dict[str, list[tuple[bytes, AggregateReady]]] = {}
    start: bytes | str = "-"
    while True:
        entries: Any = await redis.xrange(keys.aggregate_stream, min=start, max="+", count=PAGE)
        for entry_id, fields in entries:
            try:
                ready = decode(AggregateReady, fields)
            except MalformedMessage:
                continue
            results.setdefault(job_key_of(ready), []).append((entry_id, ready))
        if len(entries) < PAGE:
            return results
        start = b"(" + entries[-1][0]


async def check_references(blobs: BlobStore, plan: Plan, tracker: Tracker,
                           results: dict[str, list[tuple[bytes, AggregateReady]]],
                           keys_to_check: list[str], max_bytes: int) -> list[dict[str, Any]]:
    """Compare sampled results with the NumPy weighted mean of their job's updates."""
    checks = []
    for key in keys_to_check:
        job = tracker.jobs[key]
        model = decode_layers(await blobs.get(results[key][0][1].model_digest), max_bytes=max_bytes)
        got = model[LAYER]
        expected = weighted_mean(plan.clients, [ref.num_examples for ref in job.updates])
        error = float(np.max(np.abs(got.astype(np.float64) - expected)))
        ok = got.dtype == np.float32 and bool(np.allclose(got, expected, rtol=REFERENCE_RTOL,
                                                          atol=REFERENCE_ATOL))
        checks.append({"job": key, "max_abs_error": error, "ok": ok})
    return checks


def reference_sample(tracker: Tracker, results: dict[str, list[tuple[bytes, AggregateReady]]],
                     kill: KillReport | None, count: int) -> list[str]:
    """First and last job, jobs held by the killed worker, duplicated jobs, then others."""
    done = [k for k in tracker.job_entries if k in results]
    chosen: list[str] = []
    preferred = [*done[:1], *done[-1:], *(kill.held_jobs if kill else []),
                 *(k for k in done if len(results[k]) > 1), *done[1::7]]
    for key in preferred:
        if key in results and key not in chosen:
            chosen.append(key)
    return chosen[:count]


def fingerprint(digests: dict[str, str]) -> str:
    """SHA-256 over sorted ``job key=model digest`` lines: equal across runs with equal seeds."""
    lines = "\n".join(f"{key}={digest}" for key, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def percentiles(latencies_ms: list[int]) -> dict[str, float]:
    if not latencies_ms:
        return {}
    values = np.asarray(latencies_ms, np.float64)
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)), "max": float(values.max())}


def summarise(args: argparse.Namespace, tracker: Tracker,
              results: dict[str, list[tuple[bytes, AggregateReady]]]) -> dict[str, Any]:
    expected = [f"{training_name(t)}/{r}/1" for t in range(args.concurrent)
                for r in range(1, args.rounds + 1)]
    published = list(tracker.job_entries)
    answered = [k for k in published if k in results]
    latencies = {k: entry_ms(results[k][0][0]) - entry_ms(tracker.job_entries[k]) for k in answered}
    span_ms = (max(entry_ms(results[k][0][0]) for k in answered)
               - min(entry_ms(tracker.job_entries[k]) for k in published)) if answered else 0
    workers: dict[str, int] = {}
    for key in answered:
        for _entry, ready in results[key]:
            workers[ready.worker] = workers.get(ready.worker, 0) + 1
    duplicated = {k: len(results[k]) for k in answered if len(results[k]) > 1}
    differing = sorted(k for k in answered if len({r.model_digest for _e, r in results[k]}) > 1)
    return {
        "jobs_expected": len(expected), "jobs_published": len(published),
        "jobs_with_result": len(answered), "jobs_lost": len(expected) - len(answered),
        "lost_job_keys": sorted(set(expected) - set(answered)),
        "results_total": sum(len(results[k]) for k in answered),
        "jobs_with_duplicate_results": len(duplicated), "duplicates": duplicated,
        "jobs_with_differing_results": differing,
        "jobs_per_s": len(answered) / (span_ms / 1000) if span_ms else 0.0, "span_s": span_ms / 1000,
        "latency_ms": percentiles(list(latencies.values())),
        "slowest_jobs_ms": dict(sorted(latencies.items(), key=lambda kv: -kv[1])[:3]),
        "workers": workers,
        "model_digests": {k: results[k][0][1].model_digest for k in answered},
        "fingerprint": fingerprint({k: results[k][0][1].model_digest for k in answered}),
    }


def print_report(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    lat = summary["latency_ms"]
    print(f"{args.concurrent} concurrent trainings x {args.rounds} rounds, {args.clients} clients, "
          f"dim {args.dim}, {args.algorithm}, {args.workers} worker(s)"
          f"{', one killed' if args.kill_worker else ''}")
    print(f"jobs: {summary['jobs_expected']} expected, {summary['jobs_published']} published, "
          f"{summary['jobs_with_result']} with a result, {summary['jobs_lost']} lost")
    print(f"throughput: {summary['jobs_per_s']:.1f} jobs/s over {summary['span_s']:.2f}s "
          f"(first job XADD to last first result); pending in the group at the end: "
          f"{summary['pending_after_drain']}")
    if lat:
        print(f"latency ms (job XADD -> first AggregateReady, server clock): p50 {lat['p50']:.0f}  "
              f"p90 {lat['p90']:.0f}  p99 {lat['p99']:.0f}  max {lat['max']:.0f}")
        print("slowest: " + ", ".join(f"{k} {v} ms" for k, v in summary["slowest_jobs_ms"].items()))
    print("workers used: " + ", ".join(f"{w} ({n} results)" for w, n in sorted(summary["workers"].items())))
    print(f"duplicate results: {summary['jobs_with_duplicate_results']} job key(s) "
          f"{summary['duplicates'] or ''} (at-least-once delivery: a job redone after its worker "
          f"died between writing the result and acking; the privacy manager releases once per "
          f"(training, round) and re-announces the recorded release for a repeat)")
    print(f"determinism: {len(summary['jobs_with_differing_results'])} job key(s) with differing "
          f"model digests {summary['jobs_with_differing_results'] or ''}; fingerprint of all "
          f"results {summary['fingerprint'][:16]} (equal across runs with the same arguments)")
    kill = summary.get("kill")
    if kill and not kill["consumer"]:
        print(f"kill: {kill['error']}")
    elif kill:
        back = "not seen" if kill["restart_s"] is None else f"{kill['restart_s']:.1f}s"
        print(f"kill: {kill['consumer']} (pid {kill['pid']}) SIGKILLed holding {kill['held_jobs']}; "
              f"restarted as pid {kill['restarted_pid']} after {back}; results of the held job(s) "
              f"by worker: {kill['held_jobs_answered_by']} {kill['error']}")
    refs = summary["reference"]
    if isinstance(refs, str):
        print(f"reference: {refs}")
    else:
        worst = max((c["max_abs_error"] for c in refs), default=0.0)
        print(f"reference (NumPy weighted mean): {sum(c['ok'] for c in refs)}/{len(refs)} match, "
              f"max abs error {worst:.2e}")


def failures(summary: dict[str, Any]) -> list[str]:
    reasons = []
    if summary["jobs_lost"]:
        reasons.append(f"{summary['jobs_lost']} job(s) lost: {summary['lost_job_keys']}")
    if summary["jobs_with_differing_results"]:
        reasons.append(f"differing results for {summary['jobs_with_differing_results']}")
    if not isinstance(summary["reference"], str) and not all(c["ok"] for c in summary["reference"]):
        reasons.append("a result differs from the NumPy reference")
    kill = summary.get("kill")
    if kill and (kill["error"] or kill["restarted_pid"] is None):
        reasons.append(f"kill-worker: {kill['error'] or 'no restart seen'}")
    return reasons


async def stress(deployment: LocalDeployment, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    keys = Keys(settings.redis_key_prefix)
    redis = await connect(deployment.redis_url, settings, attempts=settings.redis_connect_attempts)
    blobs = services_blob_store(redis, keys, max_bytes=settings.max_blob_bytes, blob_dir=settings.blob_dir)
    tracker, stop, kill = Tracker(), asyncio.Event(), KillReport() if args.kill_worker else None
    trainings_done = asyncio.Event()
    try:
        plan = await upload(blobs, args)
        follower = asyncio.create_task(follow_results(redis, keys, tracker, stop))
        async with httpx.AsyncClient(base_url=deployment.dashboard_url, timeout=10) as http:
            killer = None if kill is None else asyncio.create_task(
                kill_busy_worker(redis, keys, http, tracker, kill, args.concurrent, trainings_done))
            await asyncio.gather(*(run_training(redis, keys, tracker, plan, args, t)
                                   for t in range(args.concurrent)))
            trainings_done.set()
            if killer is not None:
                await killer
        left = await wait_drained(redis, keys)
        stop.set()
        await follower
        results = await all_results(redis, keys)
        summary = summarise(args, tracker, results)
        summary["pending_after_drain"] = left
        if args.algorithm in REFERENCE_RULES:
            sample = reference_sample(tracker, results, kill, args.verify)
            summary["reference"] = await check_references(blobs, plan, tracker, results, sample,
                                                          settings.max_blob_bytes)
        else:
            summary["reference"] = f"skipped (NumPy reference only for {', '.join(REFERENCE_RULES)})"
        if kill is not None:
            summary["kill"] = {**kill.__dict__, "held_jobs_answered_by": {
                k: [r.worker for _e, r in results.get(k, [])] for k in kill.held_jobs}}
        return summary
    finally:
        stop.set()
        await redis.aclose()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--concurrent", type=int, required=True, help="trainings aggregating at once")
    p.add_argument("--workers", type=int, default=2, help="aggregator worker processes")
    p.add_argument("--rounds", type=int, default=5, help="rounds (aggregation jobs) per training")
    p.add_argument("--clients", type=int, default=20, help="updates per job")
    p.add_argument("--dim", type=int, default=100_000, help="float32 parameters per update")
    p.add_argument("--algorithm", default="fedavg", choices=sorted(RULES), metavar="RULE",
                   help="aggregation rule of every training")
    p.add_argument("--kill-worker", action="store_true", help="SIGKILL a worker holding a job")
    p.add_argument("--seed", type=int, default=0, help="seed of the updates")
    p.add_argument("--verify", type=int, default=5, help="results checked against NumPy")
    p.add_argument("--job-timeout-s", type=float, default=120.0, help="per job, XADD to first result")
    p.add_argument("--timeout-s", type=float, default=600.0, help="the whole stress phase")
    p.add_argument("--config", type=Path, default=ROOT / "config.json", metavar="FILE",
                   help="config file of the deployment (its own data folder, free ports)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the summary here")
    args = p.parse_args()
    for name in ("concurrent", "workers", "rounds", "clients", "dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name} is {getattr(args, name)}; must be >= 1")
    try:
        create_strategy(args.algorithm)
    except ValueError as exc:
        p.error(f"--algorithm {args.algorithm}: {exc}")
    return args


def deployment_for(args: argparse.Namespace) -> tuple[Settings, LocalDeployment]:
    port = free_port()
    env = {"FL_AGGREGATOR_WORKERS": str(args.workers), "FL_METRICS_PORT_BASE": "0",
           "FL_DASHBOARD_PORT": str(port), "FL_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
           "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(NUMBA_CACHE_DIR))}
    settings = load_settings(args.config).model_copy(update={
        "aggregator_workers": args.workers, "metrics_port_base": 0, "dashboard_port": port,
        "claim_idle_ms": CLAIM_IDLE_MS, "data_dir": DATA_DIR})
    return settings, LocalDeployment(settings, args.config, DATA_DIR, env)


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    try:
        settings, deployment = deployment_for(args)
        started = time.monotonic()
        with deployment:
            log.info("deployment healthy in %.1fs (%s)", time.monotonic() - started, deployment.dashboard_url)
            summary = asyncio.run(asyncio.wait_for(stress(deployment, settings, args), args.timeout_s))
    except (ConfigError, DeploymentFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"error: the stress phase did not finish within {args.timeout_s:.0f}s", file=sys.stderr)
        return 1
    print_report(args, summary)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **summary},
                                        indent=1, default=str))
    problems = failures(summary)
    for problem in problems:
        print(f"FAIL: {problem}")
    print("FAIL" if problems else "OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
