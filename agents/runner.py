"""Run the user's model as agents: ``python -m agents run --app MODULE:FACTORY --agent-id ID``.

The factory is the user's code: called with the agent id (or with nothing, when it takes no
argument), it returns an ``agents.app.Trainer``, an ``agents.adapters.torch.TorchTrainer`` (an
``nn.Module`` with the user's train and evaluate functions), a Flower ``NumPyClient``, or, for
memory-bank trainings, an ``agents.app.MemoryBankTrainer`` (a feature extractor). The
runner does the rest, as for every agent: join (with a join token where registration is
closed), heartbeats, signed notices, clipping, noise, compression and secure aggregation as
each training asks, and a clean leave on SIGTERM or Ctrl-C.

The bus: ``--deployment FILE`` (default ``data/run/deployment.json``, written by the launcher;
with Redis ACLs the agent logs in as its own user) or ``--redis-url URL``. ``--agents N`` runs N
agents in this process (ids ``<ID>-0`` ... ``<ID>-<N-1>``), for simulations.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agents.app import MemoryBankTrainer, Trainer, as_trainer
from agents.client import FederatedClient
from agents.shared_models import SharedModels
from federated_learning.bus.connection import with_credentials
from federated_learning.deploy.acl import AclError, agent_user_name, stored_password
from federated_learning.protocol.keys import Keys

log = logging.getLogger(__name__)
DEFAULT_DEPLOYMENT = Path("data") / "run" / "deployment.json"


class RunnerError(RuntimeError):
    """A command line the runner cannot act on; the message says what to change."""


def load_factory(spec: str) -> Callable[..., object]:
    """``package.module:function`` -> the function."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise RunnerError(f"--app must be MODULE:FACTORY (e.g. examples.pytorch_digits.app:make_trainer); got {spec!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the user's module beside where they run the command
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RunnerError(f"cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise RunnerError(f"{module_name!r} has no callable {attribute!r}")
    return factory  # type: ignore[no-any-return]


def build_trainer(factory: Callable[..., object], agent_id: str) -> Trainer | MemoryBankTrainer:
    """Call the factory (with the agent id when it takes an argument) and adapt what it returns: a
    feature extractor of memory-bank trainings is taken as it is, a model as a Trainer."""
    takes_id = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                   for p in inspect.signature(factory).parameters.values())
    app = factory(agent_id) if takes_id else factory()
    if isinstance(app, MemoryBankTrainer) and not callable(getattr(app, "get_parameters", None)):
        return app
    return as_trainer(app)


@dataclass(frozen=True)
class BusAccess:
    redis_url: str
    key_prefix: str


def bus_access(deployment: Path | None, redis_url: str | None, key_prefix: str | None, agent_id: str) -> BusAccess:
    """Where the agent's bus is and how it logs in (its own ACL user in an ACL deployment)."""
    if redis_url is not None:
        return BusAccess(redis_url, key_prefix or "fl")
    path = deployment or DEFAULT_DEPLOYMENT
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunnerError(f"cannot read the deployment file {path} ({exc}); start a deployment "
                          "(scripts/deploy-federated-learning.py) or pass --redis-url") from exc
    prefix = key_prefix or str(info.get("key_prefix", "fl"))
    url = str(info["redis_url"])
    if info.get("redis_acl"):
        try:
            user = agent_user_name(Keys(prefix), agent_id)
            url = with_credentials(url, user, stored_password(Path(info["redis_acl_secrets"]), user))
        except AclError as exc:
            raise RunnerError(f"{exc} (the deployment gives each agent its own Redis user: "
                              f"--provision-acl --agents {agent_id})") from exc
    return BusAccess(url, prefix)


def agent_ids(agent_id: str, count: int) -> list[str]:
    return [agent_id] if count == 1 else [f"{agent_id}-{i}" for i in range(count)]


async def run_agents(args: argparse.Namespace) -> None:
    factory = load_factory(args.app)
    agents: list[FederatedClient] = []
    shared_models = SharedModels()  # the agents of this process read each model once
    for agent_id in agent_ids(args.agent_id, args.agents):
        trainer = build_trainer(factory, agent_id)
        access = bus_access(args.deployment, args.redis_url, args.key_prefix, agent_id)
        examples = args.num_examples or int(getattr(trainer, "num_examples", 0) or 1)
        agents.append(FederatedClient(
            agent_id, redis_url=access.redis_url, key_prefix=access.key_prefix, trainer=trainer,
            dataset=args.dataset, num_examples=examples, heartbeat_interval_s=args.heartbeat_s,
            state_dir=args.state_dir, join_token=args.join_token, blob_folder=args.blob_folder,
            blob_endpoint_url=args.blob_endpoint_url,
            shared_models=shared_models))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await asyncio.gather(*(agent.initialize() for agent in agents))
    log.info("%d agent(s) joined: %s (dataset '%s')", len(agents), ", ".join(a.agent_id for a in agents),
             args.dataset)
    await stop.wait()
    await asyncio.gather(*(agent.close("stopped") for agent in agents))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run agents of the user's model",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--app", required=True, help="MODULE:FACTORY returning a Trainer, TorchTrainer or NumPyClient")
    run.add_argument("--agent-id", required=True, help="this agent's id (letters, digits, '_', '-', '.')")
    run.add_argument("--deployment", type=Path, default=None,
                     help=f"the launcher's deployment file (default {DEFAULT_DEPLOYMENT})")
    run.add_argument("--redis-url", default=None, help="the bus, instead of a deployment file")
    run.add_argument("--key-prefix", default=None, help="key prefix (default: the deployment's, else 'fl')")
    run.add_argument("--dataset", default="default", help="the dataset name trainings ask for")
    run.add_argument("--num-examples", type=int, default=None,
                     help="examples announced at join (default: the trainer's num_examples, else 1)")
    run.add_argument("--agents", type=int, default=1, help="agents in this process (simulation)")
    run.add_argument("--heartbeat-s", type=float, default=10.0, help="seconds between heartbeats")
    run.add_argument("--state-dir", type=Path, default=None, help="keeps the agents' keys across restarts")
    run.add_argument("--join-token", default=None, help="needed where registration is closed")
    run.add_argument("--blob-folder", type=Path, default=None,
                     help="the deployment's blob_dir as mounted here, when it keeps blobs as files and this "
                          "host mounts them at another path (default: the path the services use)")
    run.add_argument("--blob-endpoint-url", default=None,
                     help="the deployment's object store as reached from here, when it keeps blobs in a bucket "
                          "and this host reaches it at another URL (default: the services' URL; credentials: "
                          "the standard AWS chain)")
    run.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.agents < 1:
        print("error: --agents must be >= 1", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_agents(args))
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
