"""Queueing a cluster transaction: our client against redis-py's own, on a local 3-primary cluster.

Starts a Valkey Cluster from the bundled binaries (``deploy/cluster.py``), then times, for each
client, queueing N HINCRBY of one hash slot in a transaction (what a coordinator batch queues) and
running it, the median of --repeat tries. redis-py's cluster pipeline queues each command of a
transaction through a thread of its own; ``bus/cluster_client.py`` queues key-first writes on the
caller's thread (docs/decisions/0013-valkey-cluster.md).

Usage: .venv/bin/python scripts/benchmark-cluster-transactions.py [--commands 1000] [--repeat 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import use_venv

use_venv()

import argparse
import asyncio
import statistics
import tempfile
import time

from redis.asyncio.cluster import RedisCluster

from federated_learning.bus.cluster_client import ServicesCluster
from federated_learning.deploy.cluster import LocalCluster


async def timed(client: RedisCluster, commands: int, repeat: int) -> tuple[float, float]:
    """Median seconds to queue ``commands`` HINCRBY in a transaction, and to run it."""
    await client.initialize()
    queued, ran = [], []
    for _ in range(repeat):
        began = time.perf_counter()
        async with client.pipeline(transaction=True) as pipe:
            for i in range(commands):
                pipe.hincrby("bench:{fl}:stats", f"agent-{i}", 1)
            middle = time.perf_counter()
            await pipe.execute()
        ran.append(time.perf_counter() - middle)
        queued.append(middle - began)
    await client.aclose()
    return statistics.median(queued), statistics.median(ran)


async def measure(url: str, commands: int, repeat: int) -> None:
    print(f"| client | queue {commands} commands (median of {repeat}) | run them (EXEC) |")
    print("|---|---|---|")
    for name, kind in (("redis-py RedisCluster", RedisCluster), ("ours (ServicesCluster)", ServicesCluster)):
        queue_s, run_s = await timed(kind.from_url(url), commands, repeat)
        print(f"| {name} | {queue_s * 1000:.1f} ms | {run_s * 1000:.1f} ms |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fl-cluster-bench-") as folder, \
            LocalCluster(Path(folder), shards=3, replicas=0) as cluster:
        asyncio.run(measure(cluster.url, args.commands, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
