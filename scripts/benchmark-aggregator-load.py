#!/usr/bin/env python3
"""Time the aggregator's load-and-aggregate path on a real valkey-server.

Starts a valkey-server (as tests/integration/conftest.py does) in a temporary folder, stores
a base model of --dim float32 values and --clients update blobs under the agents' upload
keys (dense float32, or --compression q8: the 8-bit quantized delta an agent sends), then
runs ``Aggregator.aggregate`` on one FedAvg job --repeats times, after one warm-up call.

Per call:
- ready: wall seconds until the call returns the ``AggregateReady`` (model stored; what the
  round waits for);
- scored: wall seconds until the update anomaly scores are done too (the same as ready where the
  scores are computed inside the call; none at all above 50M values, e.g. 69 x 1M);
- CPU: process CPU seconds (all threads) until then.

Usage: .venv/bin/python scripts/benchmark-aggregator-load.py [--clients 69] [--dim 1000000]
    [--compression none|q8] [--repeats 5] [--cores 2] [--json FILE]
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
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from federated_learning.bus.embedded import EmbeddedValkey
from federated_learning.config import Settings
from federated_learning.privacy.compression import quantize
from federated_learning.protocol.messages import AggregationJob, UpdateRef
from federated_learning.protocol.tensors import encode_layers
from federated_learning.protocol.updates import encode_compressed
from federated_learning.services.runtime import ServiceContext

API_KEY = "benchmark-key-0123456789abcdef"


async def store_blobs(ctx: ServiceContext, clients: int, dim: int, compression: str) -> AggregationJob:
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal(dim).astype(np.float32)}
    base_digest = await ctx.blobs.put(encode_layers(base))
    refs = []
    for k in range(clients):
        delta = (0.01 * rng.standard_normal(dim)).astype(np.float32)
        if compression == "q8":
            data = encode_compressed(quantize([delta], 8, rng))
        else:
            data = encode_layers({"w": base["w"] + delta})
        agent = f"agent-{k:03d}"
        digest = await ctx.blobs.put(data, owner=agent)
        refs.append(UpdateRef(agent_id=agent, digest=digest, num_examples=10 + k))
    return AggregationJob(training_id="bench", round=1, attempt=1, algorithm="fedavg",
                          base_version=0, base_digest=base_digest, updates=refs,
                          carry_integers=compression == "none")


async def one_call(aggregator: Any, job: AggregationJob) -> tuple[float, float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    await aggregator.aggregate(job)
    ready = time.perf_counter() - started
    finish = getattr(aggregator, "finish_scoring", None)
    if finish is not None:
        await finish()
    return ready, time.perf_counter() - started, time.process_time() - cpu


async def run(args: argparse.Namespace, url: str, data_dir: Path) -> dict[str, Any]:
    from federated_learning.aggregation import configure_threads
    from federated_learning.services.aggregator import Aggregator, warm_up

    configure_threads(args.cores)
    warm_up()
    settings = Settings(data_dir=data_dir, metrics_port_base=0, dashboard_port=0, cpu_cores=args.cores,
                        max_blob_bytes=8 * args.dim + (1 << 20), api_key=API_KEY)
    client = aioredis.Redis.from_url(url)
    ctx = ServiceContext(redis=client, settings=settings, service="aggregator", instance="0")
    try:
        job = await store_blobs(ctx, args.clients, args.dim, args.compression)
        aggregator = Aggregator(ctx)
        await one_call(aggregator, job)
        times = [await one_call(aggregator, job) for _ in range(args.repeats)]
    finally:
        await client.aclose()
    ready = [t[0] for t in times]
    scored = [t[1] for t in times]
    cpu = [t[2] for t in times]
    return {"clients": args.clients, "dim": args.dim, "compression": args.compression, "cores": args.cores,
            "ready_s": ready, "scored_s": scored, "cpu_s": cpu,
            "ready_median_s": statistics.median(ready), "ready_min_s": min(ready),
            "scored_median_s": statistics.median(scored), "cpu_median_s": statistics.median(cpu),
            "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--clients", type=int, default=69)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--compression", choices=("none", "q8"), default="none")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cores", type=int, default=2, help="the aggregator's configured cpu_cores")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as folder:
        server = EmbeddedValkey(Path(folder) / "valkey")
        url = server.start()
        try:
            report = asyncio.run(run(args, url, Path(folder) / "data"))
        finally:
            server.stop()
    line = (f"{args.clients} x {args.dim} {args.compression}: ready median {report['ready_median_s']:.3f} s "
            f"(min {report['ready_min_s']:.3f}), with scores {report['scored_median_s']:.3f} s, "
            f"CPU {report['cpu_median_s']:.3f} s; load {report['load_average'][0]:.2f}")
    sys.stdout.write(line + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
