"""Registered agents that only heartbeat: load for the coordinator's registry, never asked to train.

Joins --count agents (each with its own Ed25519 key) holding a dataset no training uses, then
sends each a signed heartbeat every --heartbeat-s seconds, spread evenly, through one connection,
until SIGTERM. ``scripts/benchmark-rounds.py --idle-agents N`` runs it beside the training agents,
so that a round of 100 asked agents runs while 10,000 are registered and alive.

It writes with the connection it is given (the benchmark passes its services' one): the agents
are simulated, and their load is what is measured, not their access rights.

Usage: .venv/bin/python scripts/idle_agents.py --redis-url redis://... --count 9000
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import use_venv

use_venv()

import argparse
import signal
import time

import redis

from federated_learning.privacy.signing import AgentKeyPair
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import AgentJoined, Heartbeat, encode

IDLE_DATASET = "idle"
BATCH = 200
"""Messages per pipeline."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--key-prefix", default="fl")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--heartbeat-s", type=float, default=30.0)
    parser.add_argument("--prefix", default="idle")
    parser.add_argument("--cluster", action="store_true", help="the URL is a node of a Valkey or Redis Cluster")
    args = parser.parse_args(argv)
    client = redis.RedisCluster.from_url(args.redis_url) if args.cluster else redis.Redis.from_url(args.redis_url)
    keys = Keys(args.key_prefix, cluster=args.cluster)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    agents = [(f"{args.prefix}-{k:05d}", AgentKeyPair.generate()) for k in range(args.count)]

    def send(messages: list[AgentJoined | Heartbeat], pairs: list[tuple[str, AgentKeyPair]]) -> None:
        with client.pipeline(transaction=False) as pipe:
            for message, (_agent, key) in zip(messages, pairs, strict=True):
                signed = message.model_copy(update={"signature": key.sign(message.signed_bytes()).hex()})
                pipe.xadd(keys.agent_stream, encode(signed))
            pipe.execute()

    for start in range(0, len(agents), BATCH):
        pairs = agents[start:start + BATCH]
        send([AgentJoined(agent_id=agent, datasets={IDLE_DATASET: 10}, public_key=key.public_key_bytes.hex())
              for agent, key in pairs], pairs)
    print(f"joined {len(agents)} idle agents", flush=True)
    period = args.heartbeat_s * BATCH / max(1, len(agents))
    while not stopping:
        for start in range(0, len(agents), BATCH):
            if stopping:
                break
            began = time.monotonic()
            pairs = agents[start:start + BATCH]
            send([Heartbeat(agent_id=agent) for agent, _key in pairs], pairs)
            time.sleep(max(0.0, period - (time.monotonic() - began)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
