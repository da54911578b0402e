"""A local Valkey Cluster (3 primaries, 3 replicas) from the bundled binaries, until Ctrl-C.

For trying the system on a cluster on one machine: it prints the URL to give the deployment,

    FL_REDIS_URL=<url> .venv/bin/python scripts/deploy-federated-learning.py

and the primaries' ports, so that one can be killed (``kill -9``) to watch a replica take over.
The nodes keep their append-only files and ``nodes.conf`` in --dir/node-<i>.

Usage: .venv/bin/python scripts/local-valkey-cluster.py --dir /tmp/cluster [--shards 3 --replicas 1]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import use_venv

use_venv()

import argparse
import secrets
import signal
import threading

from federated_learning.deploy.cluster import LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="a fresh folder for the nodes' data")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--node-timeout-ms", type=int, default=2000,
                        help="how long a primary may be unreachable before a replica takes over")
    args = parser.parse_args(argv)
    if args.dir.exists() and any(args.dir.iterdir()):
        parser.error(f"{args.dir} is not empty: the nodes need a fresh folder")
    password = secrets.token_urlsafe(24)
    stop = threading.Event()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: stop.set())
    with LocalCluster(args.dir, shards=args.shards, replicas=args.replicas,
                      node_timeout_ms=args.node_timeout_ms, password=password) as cluster:
        print(f"cluster URL: {cluster.url}")
        for owner in cluster.owners():
            print(f"  slots from {owner.slot}: primary on port {owner.primary_port}, "
                  f"replicas on {', '.join(map(str, owner.replica_ports)) or 'none'}")
        print("Ctrl-C stops every node", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
