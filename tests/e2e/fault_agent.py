"""An agent in a process of its own, for the fault tests to kill and start again.

``python -m tests.e2e.fault_agent AGENT_ID SHARD --redis-url URL --state-dir DIR`` runs one agent
on shard SHARD of a 12-way digits split (the preset models of ``training_body``). Its Ed25519 key
is kept in DIR, so a restarted agent is the same agent to the coordinator. It leaves on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from agents.client import FederatedClient
from agents.data import make_client_datasets

SHARDS = 12
HEARTBEAT_S = 0.5


async def run(agent_id: str, shard: int, redis_url: str, state_dir: Path) -> None:
    data = make_client_datasets(SHARDS, "dirichlet:0.5", 0)[0][shard]
    agent = FederatedClient(agent_id, redis_url=redis_url, heartbeat_interval_s=HEARTBEAT_S, state_dir=state_dir)
    agent.add_dataset("digits", data.train.x, data.train.y, x_eval=data.eval.x, y_eval=data.eval.y)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await agent.initialize()
    await stop.wait()
    await agent.close("stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("agent_id")
    parser.add_argument("shard", type=int, choices=range(SHARDS), metavar=f"SHARD (0..{SHARDS - 1})")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--state-dir", type=Path, required=True, help="keeps the agent's key across restarts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.agent_id} %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(args.agent_id, args.shard, args.redis_url, args.state_dir))


if __name__ == "__main__":
    main()
