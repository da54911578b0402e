#!/usr/bin/env python3
"""Benchmark whole rounds end to end: the deployed system, and Flower's gRPC server on the same work.

Deploys every service on an embedded valkey-server (as scripts/demo.py does) with privacy off
and FedAvg, uploads a synthetic user model (``agents/synthetic.py``: d float32 parameters whose
training costs nothing) and runs --agents agents of it in --agent-processes processes of
``python -m agents run``; by default every agent is asked every round. Then, when ``flwr``
imports and --flower is on, the same model, agents and rounds on Flower's legacy gRPC server
(``flwr.server.start_server``, FedAvg, min_fit_clients = N, no evaluate rounds) with N
``NumPyClient``s in threads of as many processes.

Reports:
- s/round: median over rounds >= 2 of the time between consecutive commits (ours: the round
  metrics' ``completed_at``; Flower: the end of ``aggregate_fit``), and the median round's own
  length (ours: round opened -> committed; Flower: clients sampled -> end of aggregate_fit);
- time to round 1 committed, from the start of the run and from the training's start;
- per round, the phases the bus shows (event stream, update and aggregate streams): collect
  (round_started -> round_closed), first and last update notice, aggregate (round_closed ->
  AggregateReady), release (-> model_released), commit (-> version_committed) and complete
  (-> round_completed);
- peak RSS (VmHWM) and CPU seconds of every process of the run;
- bus bytes per round: valkey's total_net_input_bytes + total_net_output_bytes over rounds
  2..R (this script's own reads taken out), against the model bytes N d 4 x 2;
- the data-path floor (``round_floor.py``, --floor): the same N uploads of d values encoded,
  hashed, written, read, hash-checked and folded, and the model written back, with no protocol
  around them; both systems' s/round against it, and how far a round 3 x faster than Flower's
  is from it.

Usage (see docs/performance.md, "Rounds end to end"):
    .venv/bin/python scripts/benchmark-rounds.py --agents 10 --params 100000 --rounds 5
    .venv/bin/python scripts/benchmark-rounds.py --agents 1000 --params 650 --rounds 5 \
        --agent-processes 4 --no-flower --json reports/rounds.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import HelpFormatter, use_venv

use_venv()

import argparse
import contextlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from round_floor import measure_floor

from agents.runner import agent_ids
from agents.synthetic import LAYERS_ENV, PARAMS_ENV, initial_model
from federated_learning.bus.embedded import EmbeddedServerError, free_port
from federated_learning.bus.replies import read_batches, text
from federated_learning.config import ConfigError, load_settings
from federated_learning.deploy.access import admin_url_for
from federated_learning.deploy.cluster import LocalCluster
from federated_learning.deploy.launcher import deployment_file, read_deployment
from federated_learning.deploy.local import DeploymentFailed, LocalDeployment, stop_on_sigterm
from federated_learning.protocol.keys import Keys, partition_of
from federated_learning.protocol.messages import LocalTrainingSettings
from federated_learning.rest_client import ApiError, RestClient

logger = logging.getLogger("benchmark-rounds")

COMPRESSIONS = typing.get_args(LocalTrainingSettings.model_fields["compression"].annotation)
FINAL_STATUSES = ("completed", "failed", "stopped")
DATASET = "synthetic"
TAIL_BLOCK_MS = 500
JOIN_TIMEOUT_S = 120.0
"""Seconds the agents may take to join, plus 0.1 s per agent."""
FLOWER_LISTEN_TIMEOUT_S = 60.0
STOP_WAIT_S = 30.0
FLOWER_WORKER = Path(__file__).resolve().parent / "flower_rounds.py"
WATCHER = "benchmark (watcher)"
TOP_COMMANDS = 8
SERVICES = ("coordinator", "aggregator", "privacy", "versions", "monitor", "dashboard")


class BenchmarkFailed(RuntimeError):
    """Something did not come up or the training did not complete; the message is the one line."""


# -- the bus, as this script watches it ---------------------------------------------------


@dataclass
class RoundTimes:
    """Unix times of one round's steps, as the bus shows them (None: not seen)."""

    started: float | None = None
    first_notice: float | None = None
    last_notice: float | None = None
    notices: int = 0
    closed: float | None = None
    aggregated: float | None = None
    released: float | None = None
    committed: float | None = None
    completed: float | None = None


@dataclass
class BusSnapshot:
    """Valkey's byte counters (in all, this script's own connection's, each process's
    connections'), its command counts and each process's CPU seconds, when a round completed."""

    at: float
    server_in: int
    server_out: int
    own_bytes: int
    """In and out of this script's own connections (taken out of the totals)."""
    cpu_s: dict[str, float]
    bytes_by_process: dict[str, int]
    commands: dict[str, tuple[int, int]]
    """Command -> (calls, microseconds) since the server started."""
    aof_rewrites: int
    """Rewrites of the append-only file since the server started (each one a fork writing it anew)."""


@dataclass
class BusTail:
    """Reads the event, update and aggregate streams without a group (as the dashboard tails
    events) in a thread; snapshots the byte counters at each ``round_completed``, summed over
    every node (one server, or each node of a cluster: replication traffic included)."""

    client: redis.Redis
    """Reads the streams (a cluster client on a cluster)."""
    nodes: list[redis.Redis]
    """One client per server node, for its counters."""
    keys: Keys
    """The cell of the measured training (``--partitions``, ``--cell``): its events and aggregates."""
    rounds: dict[tuple[str, int], RoundTimes] = field(default_factory=dict)
    snapshots: dict[tuple[str, int], BusSnapshot] = field(default_factory=dict)
    final: dict[str, tuple[str, str]] = field(default_factory=dict)
    processes: list[tuple[int, str]] = field(default_factory=list)
    """(pid, role) of the processes whose CPU time each snapshot samples."""
    ports: dict[tuple[int, int], str] = field(default_factory=dict)
    """(client port, server port) -> role of the processes' connections (:func:`local_ports`), as last read."""
    unknown_ports: set[tuple[int, int]] = field(default_factory=set)
    """Ports of connections no known process held at the last read (not looked for again)."""
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def times(self, training_id: str, round_number: int) -> RoundTimes:
        return self.rounds.setdefault((training_id, round_number), RoundTimes())

    def snapshot(self) -> BusSnapshot:
        server_in = server_out = rewrites = 0
        commands: dict[str, tuple[int, int]] = {}
        for node in self.nodes:
            stats = node.info("stats")
            server_in += int(stats["total_net_input_bytes"])
            server_out += int(stats["total_net_output_bytes"])
            rewrites += int(node.info("persistence")["aof_rewrites"])
            for name, row in node.info("commandstats").items():
                calls, usec = commands.get(name.removeprefix("cmdstat_"), (0, 0))
                commands[name.removeprefix("cmdstat_")] = (calls + int(row["calls"]), usec + int(row["usec"]))
        by_process = self.bytes_by_process()
        return BusSnapshot(at=time.time(), server_in=server_in, server_out=server_out,
                           own_bytes=by_process.get(WATCHER, 0), cpu_s=cpu_seconds(self.processes),
                           bytes_by_process=by_process, commands=commands, aof_rewrites=rewrites)

    def bytes_by_process(self) -> dict[str, int]:
        """Bytes in and out of the connections open now, summed by the process holding each
        (found by its local port); connections of no known process count as "other".

        The port map is read again only when a connection's port is not in it (a new
        connection): reading every process's sockets took 0.3 CPU s per snapshot at 1,000 agents,
        taken from the system it measures."""
        connections = [connection for node in self.nodes for connection in node.client_list()]
        # (client port, server port): one client port may serve connections to several nodes.
        port_of = {id(c): (int(str(c["addr"]).rsplit(":", 1)[1]), int(str(c["laddr"]).rsplit(":", 1)[1]))
                   for c in connections}
        if any(port not in self.ports and port not in self.unknown_ports for port in port_of.values()):
            self.ports = local_ports(self.processes)
            self.unknown_ports = {port for port in port_of.values() if port not in self.ports}
        totals: dict[str, int] = {}
        for connection in connections:
            role = self.ports.get(port_of[id(connection)], "other")
            role = "agents (all)" if role.startswith("agents-") else role
            totals[role] = totals.get(role, 0) + int(connection["tot-net-in"]) + int(connection["tot-net-out"])
        return totals

    def on_event(self, event: dict[str, Any]) -> None:
        training_id, round_number, kind = event.get("training_id"), event.get("round"), event["kind"]
        if not training_id:
            return
        if kind == "training_status" and event["data"].get("status") in FINAL_STATUSES:
            self.final[training_id] = (event["data"]["status"], event["data"].get("reason") or "")
        if round_number is None:
            return
        times = self.times(training_id, round_number)
        step = {"round_started": "started", "round_closed": "closed", "model_released": "released",
                "version_committed": "committed", "round_completed": "completed"}.get(kind)
        if step is not None and getattr(times, step) is None:
            setattr(times, step, float(event["at"]))
        if kind == "round_completed":
            self.snapshots[(training_id, round_number)] = self.snapshot()

    def on_entry(self, stream: str, entry_id: bytes, message: dict[str, Any]) -> None:
        if stream == self.keys.event_stream:
            self.on_event(message)
            return
        at = int(entry_id.split(b"-")[0]) / 1000
        times = self.times(message.get("training_id", ""), int(message.get("round", -1)))
        if stream == self.keys.aggregate_stream and times.aggregated is None:
            times.aggregated = at
        elif stream == self.keys.update_stream and message.get("type") == "update":
            times.notices += 1
            times.first_notice = at if times.first_notice is None else times.first_notice
            times.last_notice = at

    def run(self) -> None:
        # The cell's streams, then the deployment's notices: one hash slot per read on a cluster.
        cell: dict[Any, Any] = {self.keys.event_stream: "0-0", self.keys.aggregate_stream: "0-0"}
        notices: dict[Any, Any] = {self.keys.update_stream: "0-0"}
        try:
            while not self.stop.is_set():
                for streams, block in ((cell, TAIL_BLOCK_MS), (notices, None)):
                    for name, entries in read_batches(self.client.xread(streams, block=block)):
                        stream = text(name)
                        for entry_id, fields in entries:
                            streams[stream] = entry_id
                            if b"m" in fields:
                                self.on_entry(stream, entry_id, json.loads(fields[b"m"]))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which says it in one line
            self.error = exc


# -- our deployment ------------------------------------------------------------------------


def deployment_environment(args: argparse.Namespace, data_dir: Path) -> dict[str, str]:
    """Settings of the benchmark's deployment: free ports, every agent in a round, no limits
    that a thousand agents on one machine would hit (first joins per minute)."""
    return {
        "FL_DATA_DIR": str(data_dir), "FL_DASHBOARD_PORT": str(free_port()), "FL_METRICS_PORT_BASE": "0",
        "FL_REDIS_EMBEDDED_PORT": "0", "FL_REDIS_URL": "", "FL_DEFAULT_PRIVACY_LEVEL": "none",
        "FL_MAX_CLIENTS_PER_ROUND": str(max(args.agents, args.clients_per_round)),
        "FL_MIN_CLIENTS_PER_ROUND": "1", "FL_ROUND_DEADLINE_S": str(args.round_deadline_s),
        "FL_MAX_FIRST_JOINS_PER_MINUTE": str(max(600, 2 * (args.agents + args.idle_agents))),
        "NUMBA_CACHE_DIR": str(data_dir.parent / f"{data_dir.name}-numba-cache"),
        "FL_BLOB_DIR": str(data_dir / "blobs") if args.blob_store == "folder" else "",
        "FL_COORDINATOR_PARTITIONS": str(args.partitions),
        "FL_BLOB_BUCKET": args.s3_bucket if args.blob_store == "s3" else "",
        "FL_BLOB_ENDPOINT_URL": args.s3_endpoint if args.blob_store == "s3" else "",
    }


def process_agent_ids(args: argparse.Namespace) -> list[list[str]]:
    """The agent ids of each agent process: ``bench<p>-<i>``, the agents spread evenly."""
    counts = [args.agents // args.agent_processes + (1 if p < args.agents % args.agent_processes else 0)
              for p in range(args.agent_processes)]
    return [agent_ids(f"bench{p}", count) for p, count in enumerate(counts)]


@contextlib.contextmanager
def agent_processes(args: argparse.Namespace, deployment: LocalDeployment,
                    groups: list[list[str]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``python -m agents run --app agents.synthetic:make`` once per group; stopped on exit."""
    env = {**os.environ, PARAMS_ENV: str(args.params), LAYERS_ENV: str(args.layers)}
    processes: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for p, ids in enumerate(groups):
            log = open(deployment.data_dir / f"agents-{p}.log", "ab")  # noqa: SIM115 - closed below
            logs.append(log)
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "agents", "run", "--app", "agents.synthetic:make",
                 "--agent-id", f"bench{p}", "--agents", str(len(ids)), "--dataset", DATASET,
                 "--deployment", str(deployment_file(deployment.data_dir)),
                 "--heartbeat-s", str(args.heartbeat_s), "--log-level", "WARNING"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env))
        yield processes
    finally:
        stop_processes(processes)
        for log in logs:
            log.close()


@contextlib.contextmanager
def idle_agents(args: argparse.Namespace, deployment: LocalDeployment, keys: Keys,
                url: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``scripts/idle_agents.py``: --idle-agents registered agents that only heartbeat (none when 0)."""
    if not args.idle_agents:
        yield []
        return
    with open(deployment.data_dir / "idle-agents.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "idle_agents.py"), "--redis-url", url,
             "--key-prefix", keys.prefix, "--count", str(args.idle_agents), "--heartbeat-s", str(args.heartbeat_s),
             *(["--cluster"] if keys.cluster else [])],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield [process]
        finally:
            stop_processes([process])


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each (agents leave cleanly), then SIGKILL what is left after STOP_WAIT_S."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_WAIT_S
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_alive(processes: list[subprocess.Popen[bytes]], deployment: LocalDeployment) -> None:
    for p, process in enumerate(processes):
        if process.poll() is not None:
            raise BenchmarkFailed(f"agent process {p} exited with {process.returncode}; "
                                  f"see {deployment.data_dir / f'agents-{p}.log'}")
    if deployment.process is None or deployment.process.poll() is not None:
        raise BenchmarkFailed(f"the deployment exited; see {deployment.data_dir / 'deploy.log'}")


def wait_for_agents(admin: redis.Redis, keys: Keys, count: int, processes: list[subprocess.Popen[bytes]],
                    deployment: LocalDeployment) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT_S + 0.1 * count
    joined = 0
    while time.monotonic() < deadline:
        check_alive(processes, deployment)
        joined = int(admin.zcount(keys.agents_last_seen, time.time() - 600, "+inf"))
        if joined >= count:
            return
        time.sleep(0.2)
    raise BenchmarkFailed(f"only {joined} of {count} agents joined within "
                          f"{JOIN_TIMEOUT_S + 0.1 * count:.0f}s; see {deployment.data_dir}/agents-*.log")


def training_body(args: argparse.Namespace) -> dict[str, Any]:
    return {"name": "benchmark-rounds", "dataset": DATASET, "rounds": args.rounds, "algorithm": "fedavg",
            "clients_per_round": args.clients_per_round, "min_clients": args.min_clients,
            "round_deadline_s": args.round_deadline_s, "privacy_level": "none",
            "local": {"compression": args.compression}}


def training_in_cell(partitions: int, cell: int) -> str:
    """A training id in coordinator partition ``cell`` (decision 0019)."""
    for n in range(100_000):
        if partition_of(f"benchmark-{n}", partitions) == cell:
            return f"benchmark-{n}"
    raise BenchmarkFailed(f"no training id falls in partition {cell} of {partitions}")


def wait_for_training(tail: BusTail, training_id: str, processes: list[subprocess.Popen[bytes]],
                      deployment: LocalDeployment, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while training_id not in tail.final:
        if tail.error is not None:
            raise BenchmarkFailed(f"reading the bus failed: {tail.error}")
        check_alive(processes, deployment)
        if time.monotonic() > deadline:
            raise BenchmarkFailed(f"training {training_id} did not end within {timeout_s:.0f}s; "
                                  f"see {deployment.data_dir / 'logs'}")
        time.sleep(0.2)
    status, reason = tail.final[training_id]
    if status != "completed":
        raise BenchmarkFailed(f"training {training_id} {status}: {reason}")


# -- processes: peak RSS and CPU ------------------------------------------------------------


def vmhwm_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM in /proc/<pid>/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BenchmarkFailed(f"/proc/{pid}/status has no VmHWM")


def process_role(process: psutil.Process) -> str | None:
    """A deployment process by its job: a service name, ``valkey-server`` or ``launcher``; None for
    one that ended (or is ending) meanwhile."""
    try:
        command, name = " ".join(process.cmdline()), process.name()
    except psutil.Error:
        return None
    for service in SERVICES:
        if f"federated_learning.services.{service}" in command:
            return service
    if "valkey-server" in command:
        return "valkey-server"
    return "launcher" if "deploy-federated-learning" in command else name


def cpu_seconds(processes: list[tuple[int, str]]) -> dict[str, float]:
    """User + system CPU seconds of each (pid, role) so far, with its children that ended
    (valkey-server's AOF rewrites are forks); a process gone is left out."""
    seconds = {}
    for pid, role in processes:
        with contextlib.suppress(psutil.Error):
            cpu = psutil.Process(pid).cpu_times()
            seconds[role] = cpu.user + cpu.system + cpu.children_user + cpu.children_system
    return seconds


def local_ports(processes: list[tuple[int, str]]) -> dict[tuple[int, int], str]:
    """(client port, server port) -> role, for the client sockets of the processes (valkey-server's
    are its own)."""
    ports = {}
    for pid, role in processes:
        if role.startswith("valkey-server"):
            continue
        with contextlib.suppress(psutil.Error):
            for connection in psutil.Process(pid).net_connections(kind="tcp"):
                if connection.laddr and connection.raddr:
                    ports[(connection.laddr.port, connection.raddr.port)] = role
    return ports


def run_processes(deployment: LocalDeployment, processes: list[subprocess.Popen[bytes]],
                  idle: list[subprocess.Popen[bytes]], cluster: LocalCluster | None = None) -> list[tuple[int, str]]:
    """(pid, role) of the launcher, every service, valkey-server (each node of a cluster), the
    agent processes, the idle agents' process and this script (which only watches the bus)."""
    assert deployment.process is not None
    launcher = psutil.Process(deployment.process.pid)
    roles = [(child.pid, process_role(child)) for child in launcher.children(recursive=True)]
    children = sorted(((pid, role) for pid, role in roles if role is not None), key=lambda pair: pair[1])
    nodes = [(node.pid, f"valkey-server :{node.port}") for node in (cluster.nodes if cluster else [])
             if node.pid is not None]
    return [(launcher.pid, "launcher"), *children, *nodes,
            *[(process.pid, f"agents-{p}") for p, process in enumerate(processes)],
            *[(process.pid, "idle agents") for process in idle], (os.getpid(), WATCHER)]


def process_usage(processes: list[tuple[int, str]], first: BusSnapshot | None, last: BusSnapshot | None,
                  rounds: int) -> list[dict[str, Any]]:
    """Each process's VmHWM and CPU seconds, in all and per round over rounds 2..R."""
    now = cpu_seconds(processes)
    rows = []
    for pid, role in processes:
        per_round = (last.cpu_s[role] - first.cpu_s[role]) / (rounds - 1) \
            if first and last and role in first.cpu_s and role in last.cpu_s else None
        rows.append({"process": role, "pid": pid, "peak_rss_bytes": vmhwm_bytes(pid), "cpu_s": now.get(role),
                     "cpu_s_per_round": per_round})
    return rows


def kill_leftovers(processes: list[psutil.Process]) -> None:
    """SIGKILL the deployment's processes that outlived its stop (none, when it stops cleanly).
    A process that ended is not signalled even if its pid was given to another one since: psutil
    checks the creation time it saw."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running():
                process.kill()
                logger.warning("killed process %s, left after the deployment stopped", process.pid)


# -- our figures ------------------------------------------------------------------------------


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def gap(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else later - earlier


def phase_rows(tail: BusTail, training_id: str, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for r in range(1, rounds + 1):
        t = tail.rounds.get((training_id, r), RoundTimes())
        rows.append({
            "round": r, "notices": t.notices,
            "collect_s": gap(t.closed, t.started), "first_notice_s": gap(t.first_notice, t.started),
            "last_notice_s": gap(t.last_notice, t.started), "close_s": gap(t.closed, t.last_notice),
            "aggregate_s": gap(t.aggregated, t.closed), "release_s": gap(t.released, t.aggregated),
            "commit_s": gap(t.committed, t.released), "complete_s": gap(t.completed, t.committed),
            "round_s": gap(t.completed, t.started),
        })
    return rows


def bus_figures(tail: BusTail, training_id: str, args: argparse.Namespace,
                metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Bus bytes per round over rounds 2..R, this script's own traffic taken out, against the
    model bytes: N d 4 down (the global model) plus N d 4 up (dense uploads)."""
    first, last = tail.snapshots.get((training_id, 1)), tail.snapshots.get((training_id, args.rounds))
    dense = args.clients_per_round * args.params * 4 * 2
    if first is None or last is None or args.rounds < 2:
        return {"bus_bytes_per_round": None, "model_bytes_per_round": dense, "ratio": None}
    server = (last.server_in - first.server_in) + (last.server_out - first.server_out)
    own = last.own_bytes - first.own_bytes
    per_round = (server - own) / (args.rounds - 1)
    uploads = [m["upload_bytes"] for m in metrics if m["round"] >= 2]
    rounds = args.rounds - 1
    by_process = {role: (last.bytes_by_process[role] - first.bytes_by_process.get(role, 0)) / rounds
                  for role in last.bytes_by_process}
    commands = {name: ((calls - first.commands.get(name, (0, 0))[0]) / rounds,
                       (usec - first.commands.get(name, (0, 0))[1]) / rounds)
                for name, (calls, usec) in last.commands.items()}
    return {"bus_bytes_per_round": per_round, "model_bytes_per_round": dense, "ratio": per_round / dense,
            "blob_store": args.blob_store,
            "watcher_bytes_per_round": own / rounds,
            "aof_rewrites_per_round": (last.aof_rewrites - first.aof_rewrites) / rounds,
            "upload_bytes_per_round": statistics.mean(uploads) if uploads else None,
            "bytes_per_round_by_process": by_process,
            "commands_per_round": dict(sorted(commands.items(), key=lambda item: -item[1][1]))}


def round_figures(metrics: list[dict[str, Any]], run_started: float, training_started: float) -> dict[str, Any]:
    committed = [m["completed_at"] for m in metrics]
    periods = [b - a for a, b in itertools.pairwise(committed)]
    return {
        "s_per_round": median_or_none(periods),
        "round_open_to_commit_s": median_or_none([m["round_seconds"] for m in metrics[1:]]),
        "to_round1_from_start_s": committed[0] - run_started if committed else None,
        "to_round1_from_training_start_s": committed[0] - training_started if committed else None,
        "round_periods_s": periods,
    }


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Deploy (on a local Valkey Cluster with ``--cluster``), run the agents and the training,
    measure; everything stopped on the way out."""
    data_dir = args.data_dir.resolve()
    shutil.rmtree(data_dir, ignore_errors=True)
    os.environ.update(deployment_environment(args, data_dir))
    run_started = time.time()
    cluster = LocalCluster(data_dir / "cluster", shards=args.cluster, replicas=args.cluster_replicas,
                           password=secrets.token_hex(16)) if args.cluster else None
    known: list[psutil.Process] = []
    deployment: LocalDeployment | None = None
    try:
        if cluster is not None:
            logger.info("starting a local Valkey Cluster: %d primaries, %d replicas each", args.cluster,
                        args.cluster_replicas)
            try:
                os.environ["FL_REDIS_URL"] = cluster.start()
            except EmbeddedServerError as exc:
                raise BenchmarkFailed(f"the local cluster did not start: {exc}") from exc
        try:
            settings = load_settings(ROOT / "config.json")
        except ConfigError as exc:
            raise BenchmarkFailed(str(exc)) from exc
        groups = process_agent_ids(args)
        deployment = LocalDeployment(settings, ROOT / "config.json", data_dir,
                                     acl_agents=[agent for ids in groups for agent in ids])
        logger.info("starting the deployment (logs in %s)", data_dir / "logs")
        deployment.start()
        assert deployment.process is not None
        known = psutil.Process(deployment.process.pid).children(recursive=True)
        return train_and_measure(args, deployment, groups, run_started, cluster)
    except DeploymentFailed as exc:
        first, *rest = str(exc).splitlines()
        raise BenchmarkFailed(f"{first.rstrip(':')}; see {data_dir / 'deploy.log'}" if rest else first) from exc
    finally:
        try:
            if deployment is not None:
                deployment.stop()
        finally:
            kill_leftovers(known)
            if cluster is not None:
                cluster.stop()


def bus_clients(url: str, cluster: LocalCluster | None) -> tuple[redis.Redis, list[redis.Redis]]:
    """A client of the deployment's bus (a cluster client on a cluster) and one client per node."""
    if cluster is None:
        return redis.Redis.from_url(url), [redis.Redis.from_url(url)]
    nodes = [redis.Redis(host=cluster.host, port=node.port, password=cluster.password) for node in cluster.nodes]
    return cast(redis.Redis, redis.RedisCluster.from_url(url)), nodes


def train_and_measure(args: argparse.Namespace, deployment: LocalDeployment, groups: list[list[str]],
                      run_started: float, cluster: LocalCluster | None) -> dict[str, Any]:
    keys = Keys(str(read_deployment(deployment.data_dir).get("key_prefix", "fl")), cluster=cluster is not None,
                partitions=args.partitions)
    training_id = training_in_cell(args.partitions, args.cell)
    url = cluster.url if cluster is not None else admin_url_for(deployment.settings, deployment.data_dir, None,
                                                                 deployment.redis_url)
    admin = bus_clients(url, cluster)[0]
    tail = BusTail(*bus_clients(url, cluster), keys.for_training(training_id))
    watcher = threading.Thread(target=tail.run, name="bus-tail", daemon=True)
    watcher.start()
    api = RestClient(deployment.dashboard_url, deployment.api_key, verify=deployment.dashboard_verify,
                     timeout_s=120.0)
    try:
        model = api.upload_model(initial_model(args.params, args.layers), name="synthetic")
        with agent_processes(args, deployment, groups) as processes, \
                idle_agents(args, deployment, keys, url) as idle:
            wait_for_agents(admin, keys, args.agents + args.idle_agents, [*processes, *idle], deployment)
            tail.processes = run_processes(deployment, processes, idle, cluster)
            logger.info("%d agents joined in %d process(es) after %.1fs", args.agents, len(processes),
                        time.time() - run_started)
            training_started = time.time()
            started = api.start_training(training_body(args), model_id=model["model_id"], training_id=training_id)
            if started != training_id:  # a key of another organisation prefixes it: another partition
                raise BenchmarkFailed(f"the training started as {started!r}, not {training_id!r}; "
                                      "use the deployment's bootstrap key")
            wait_for_training(tail, training_id, processes, deployment, args.timeout)
            usage = process_usage(tail.processes, tail.snapshots.get((training_id, 1)),
                                  tail.snapshots.get((training_id, args.rounds)), args.rounds)
        metrics = api.metrics(training_id)
    except ApiError as exc:
        raise BenchmarkFailed(f"the dashboard refused a request: {exc}") from exc
    finally:
        tail.stop.set()
        watcher.join(2 * TAIL_BLOCK_MS / 1000)
        api.close()
        for client in (admin, tail.client, *tail.nodes):
            client.close()
    return {"training_id": training_id, **round_figures(metrics, run_started, training_started),
            "phases": phase_rows(tail, training_id, args.rounds), "processes": usage,
            "bus": bus_figures(tail, training_id, args, metrics), "metrics": metrics}


# -- Flower ----------------------------------------------------------------------------------------


def flower_available() -> bool:
    return importlib.util.find_spec("flwr") is not None


def wait_listening(port: int, server: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + FLOWER_LISTEN_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise BenchmarkFailed(f"Flower's server exited with {server.returncode}; see {log}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise BenchmarkFailed(f"Flower's server did not listen on port {port} within {FLOWER_LISTEN_TIMEOUT_S:.0f}s")


def worker(role: str, spec: dict[str, Any], log: Path) -> subprocess.Popen[str]:
    """``scripts/flower_rounds.py`` as Flower's server or a clients process; its last stdout line
    is its JSON result."""
    with open(log, "ab") as stderr:
        return subprocess.Popen([sys.executable, str(FLOWER_WORKER), role, json.dumps(spec)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)


def worker_result(process: subprocess.Popen[str], name: str, log: Path, timeout_s: float) -> dict[str, Any]:
    try:
        out, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkFailed(f"Flower's {name} did not finish within {timeout_s:.0f}s; see {log}") from exc
    if process.returncode != 0 or not out.strip():
        raise BenchmarkFailed(f"Flower's {name} exited with {process.returncode}; see {log}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def run_flower(args: argparse.Namespace) -> dict[str, Any]:
    """The same rounds on Flower: one server process, the clients in --agent-processes processes."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = args.data_dir.resolve() / "flower.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    common = {"address": address, "params": args.params, "layers": args.layers}
    run_started = time.time()
    server = worker("server", {**common, "clients": args.agents, "rounds": args.rounds}, log)
    clients: list[subprocess.Popen[str]] = []
    try:
        wait_listening(port, server, log)
        clients = [worker("clients", {**common, "ids": ids}, log) for ids in process_agent_ids(args)]
        served = worker_result(server, "server", log, args.timeout)
        usage = [worker_result(process, f"clients {p}", log, STOP_WAIT_S) for p, process in enumerate(clients)]
    finally:
        for process in (server, *clients):
            if process.poll() is None:
                process.kill()
                process.wait()
    committed = [served["committed"][str(r)] for r in range(1, args.rounds + 1)]
    periods = [b - a for a, b in itertools.pairwise(committed)]
    own = [served["committed"][str(r)] - served["opened"][str(r)] for r in range(2, args.rounds + 1)]
    return {
        "s_per_round": median_or_none(periods), "round_open_to_commit_s": median_or_none(own),
        "to_round1_from_start_s": committed[0] - run_started,
        "to_round1_from_training_start_s": committed[0] - served["opened"]["1"], "round_periods_s": periods,
        "processes": [{"process": "flower server", **{k: served[k] for k in ("peak_rss_bytes", "cpu_s",
                                                                               "cpu_s_per_round")}}]
        + [{"process": f"flower clients-{p}", **row} for p, row in enumerate(usage)],
    }


# -- report ---------------------------------------------------------------------------------------


def seconds(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(args: argparse.Namespace, ours: dict[str, Any], flower: dict[str, Any] | None) -> str:
    header = ("| system | agents | d | rounds | compression | blobs | s/round (median, r >= 2) | round open -> commit "
              "(median) | to round 1, from start | to round 1, from training start | peak RSS, server side (MB) "
              "| peak RSS, clients (MB) |")
    lines = [header, "|" + "---|" * 12]
    for name, result in (("ours", ours), ("Flower", flower)):
        if result is None:
            continue
        server = sum(row["peak_rss_bytes"] for row in result["processes"]
                     if not is_client(row["process"]) and row["process"] != WATCHER)
        clients = sum(row["peak_rss_bytes"] for row in result["processes"] if is_client(row["process"]))
        lines.append(f"| {name} | {args.agents:,} | {args.params:,} | {args.rounds} | "
                     f"{args.compression if name == 'ours' else 'none'} | "
                     f"{blobs_label(args) if name == 'ours' else 'gRPC'} | {seconds(result['s_per_round'])} | "
                     f"{seconds(result['round_open_to_commit_s'])} | {seconds(result['to_round1_from_start_s'], 1)} | "
                     f"{seconds(result['to_round1_from_training_start_s'], 2)} | {server / 1e6:,.0f} | "
                     f"{clients / 1e6:,.0f} |")
    if flower is not None and ours["s_per_round"] and flower["s_per_round"]:
        lines.append(f"\nours/Flower s/round: {ours['s_per_round'] / flower['s_per_round']:.2f}")
    return "\n".join(lines)


def blobs_label(args: argparse.Namespace) -> str:
    """Where our blobs went: Valkey (one server, or a cluster of P primaries x (1 + R) nodes) or a folder."""
    bus = f"cluster {args.cluster}x{1 + args.cluster_replicas}" if args.cluster else "redis"
    if args.blob_store == "s3":
        return f"s3 bucket {args.s3_bucket} at {args.s3_endpoint or 'AWS'} ({bus} for messages)"
    return f"folder ({bus} for messages)" if args.blob_store == "folder" else bus


def is_client(process: str) -> bool:
    """Agent and Flower client processes: not the server side."""
    return process.startswith(("agents-", "flower clients"))


def phase_table(rows: list[dict[str, Any]]) -> str:
    columns = ("collect_s", "first_notice_s", "last_notice_s", "close_s", "aggregate_s", "release_s",
               "commit_s", "complete_s", "round_s")
    header = ("| round | notices | collect | first notice | last notice | last notice -> closed | aggregate "
              "| release | commit | complete | round (open -> completed) |")
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        lines.append(f"| {row['round']} | {row['notices']} | "
                     + " | ".join(seconds(row[c]) for c in columns) + " |")
    later = rows[1:]
    medians = [median_or_none([r[c] for r in later if r[c] is not None]) for c in columns]
    lines.append("| median r >= 2 | - | " + " | ".join(seconds(m) for m in medians) + " |")
    return "\n".join(lines)


def process_table(ours: dict[str, Any], flower: dict[str, Any] | None) -> str:
    lines = ["| process | peak RSS (MB) | CPU, whole run (s) | CPU per round, r >= 2 (s) |", "|---|---|---|---|"]
    for row in [*ours["processes"], *(flower["processes"] if flower else [])]:
        lines.append(f"| {row['process']} | {row['peak_rss_bytes'] / 1e6:,.1f} | {seconds(row['cpu_s'], 1)} "
                     f"| {seconds(row.get('cpu_s_per_round'), 2)} |")
    return "\n".join(lines)


def bus_line(bus: dict[str, Any]) -> str:
    if bus["bus_bytes_per_round"] is None:
        return "bus bytes per round: not measured (needs 2 rounds or more)"
    uploads = bus["upload_bytes_per_round"]
    where = {"redis": "", "folder": "; uploads and models are files in the blob folder, which these bytes do not count",
             "s3": "; uploads and models are objects in the bucket, which these bytes do not count"}[bus["blob_store"]]
    return (f"bus bytes per round (rounds 2..R{where}): {bus['bus_bytes_per_round'] / 1e6:,.2f} MB; model bytes "
            f"N d 4 x 2: {bus['model_bytes_per_round'] / 1e6:,.2f} MB; ratio {bus['ratio']:.2f}; "
            f"agents' uploads {seconds(uploads and uploads / 1e6, 2)} MB; this script's reads "
            f"{bus['watcher_bytes_per_round'] / 1e6:,.3f} MB (taken out); AOF rewrites per round "
            f"{bus['aof_rewrites_per_round']:.1f}")


def bus_tables(bus: dict[str, Any]) -> str:
    """Bus bytes per round by process, and valkey's busiest commands per round."""
    if bus["bus_bytes_per_round"] is None:
        return ""
    lines = ["| process (its connections) | bus MB per round | share |", "|---|---|---|"]
    rows = sorted(bus["bytes_per_round_by_process"].items(), key=lambda item: -item[1])
    # Connections opened and closed between the two snapshots are in valkey's totals only.
    rows.append(("not attributed (connections closed meanwhile)",
                 bus["bus_bytes_per_round"] + bus["watcher_bytes_per_round"] - sum(n for _, n in rows)))
    for role, count in rows:
        lines.append(f"| {role} | {count / 1e6:,.2f} | {count / bus['bus_bytes_per_round']:.0%} |")
    lines += ["", f"| valkey command (top {TOP_COMMANDS} by time) | calls per round | ms per round |",
              "|---|---|---|"]
    for name, (calls, usec) in list(bus["commands_per_round"].items())[:TOP_COMMANDS]:
        lines.append(f"| {name} | {calls:,.0f} | {usec / 1000:,.1f} |")
    return "\n".join(lines)


def floor_line(ours: dict[str, Any], flower: dict[str, Any] | None, floor: dict[str, Any] | None) -> str:
    """Both systems' s/round against the data-path floor, and a round 3 x faster than Flower's
    (Flower's s/round / 3) against it."""
    if floor is None:
        return "data-path floor: not measured (--no-floor)"
    line = (f"data-path floor (dense float32 uploads through files, no protocol; {floor['threads']} threads): "
            f"{seconds(floor['s_per_round'])} s/round, "
            f"{seconds(floor['cpu_s_per_round'])} CPU-s per round")
    if ours["s_per_round"]:
        line += f"; ours/floor {ours['s_per_round'] / floor['s_per_round']:.2f}"
    if flower is not None and flower["s_per_round"]:
        third = flower["s_per_round"] / 3
        line += (f"; Flower/floor {flower['s_per_round'] / floor['s_per_round']:.2f}; a round 3 x faster than "
                 f"Flower's takes {third:.3f} s, {third - floor['s_per_round']:+.3f} s from the floor")
    return line


def report(args: argparse.Namespace, ours: dict[str, Any], flower: dict[str, Any] | None,
           floor: dict[str, Any] | None) -> str:
    return "\n\n".join([summary_table(args, ours, flower), floor_line(ours, flower, floor), phase_table(ours["phases"]),
                        process_table(ours, flower), bus_line(ours["bus"]), bus_tables(ours["bus"])]) + "\n"


# -- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--agents", type=int, default=69, help="agents (and Flower clients), N")
    p.add_argument("--params", type=int, default=1_000_000, help="float32 parameters of the model, d")
    p.add_argument("--layers", type=int, default=1, help="layers the d parameters are split into")
    p.add_argument("--rounds", type=int, default=10, help="rounds of FedAvg")
    p.add_argument("--clients-per-round", type=int, default=None, help="agents per round (default: --agents)")
    p.add_argument("--min-clients", type=int, default=None, help="fewest updates a round aggregates "
                   "(default: --clients-per-round)")
    p.add_argument("--agent-processes", type=int, default=1, help="processes the agents (and Flower's "
                   "clients) are spread over")
    p.add_argument("--compression", default="none", choices=COMPRESSIONS, help="how agents compress "
                   "their updates (Flower's run is always dense)")
    p.add_argument("--cluster", type=int, default=0, metavar="PRIMARIES",
                   help="run the bus on a local Valkey Cluster of this many primaries (at least 3) instead of "
                        "the embedded server")
    p.add_argument("--cluster-replicas", type=int, default=1, help="replicas of each primary with --cluster")
    p.add_argument("--blob-store", default="redis", choices=("redis", "folder", "s3"),
                   help="where models and uploads live: in Valkey, as files in a folder the agents share "
                        "(blob_dir, decision 0014), or in an S3 bucket (blob_bucket, decision 0018)")
    p.add_argument("--s3-bucket", default="", help="with --blob-store s3: the bucket (it must exist; credentials "
                   "from the AWS chain, e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    p.add_argument("--s3-endpoint", default="", help="with --blob-store s3: the store's URL (MinIO and the like); "
                   "empty: AWS S3")
    p.add_argument("--partitions", type=int, default=1, help="coordinator partitions (decision 0019)")
    p.add_argument("--cell", type=int, default=0, help="the partition the measured training is in (its tasks "
                   "reach the agents through an outbox unless it is 0)")
    p.add_argument("--flower", action=argparse.BooleanOptionalAction, default=True,
                   help="also run Flower's gRPC server on the same work, when flwr imports")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the data-path floor of the same N x d (round_floor.py)")
    p.add_argument("--heartbeat-s", type=float, default=30.0, help="agents' heartbeat interval")
    p.add_argument("--idle-agents", type=int, default=0, help="more registered agents that only heartbeat "
                   "(a dataset no training uses; scripts/idle_agents.py): registry load beside the rounds")
    p.add_argument("--round-deadline-s", type=float, default=600.0, help="the training's round deadline")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds each system's training may take")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "benchmark-rounds",
                   help="the deployment's data folder (emptied first)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the figures here")
    args = p.parse_args(argv)
    args.clients_per_round = args.clients_per_round or args.agents
    args.min_clients = args.min_clients or args.clients_per_round
    if args.agents < 1 or not 1 <= args.layers <= args.params:
        p.error(f"need --agents >= 1 and 1 <= --layers <= --params; got {args.agents}, {args.layers}, "
                f"{args.params}")
    if not 1 <= args.agent_processes <= args.agents:
        p.error(f"--agent-processes is {args.agent_processes}; must be in [1, --agents]")
    if args.clients_per_round > args.agents or args.min_clients > args.clients_per_round:
        p.error(f"need min-clients <= clients-per-round <= agents; got {args.min_clients}, "
                f"{args.clients_per_round}, {args.agents}")
    if args.rounds < 2:
        p.error(f"--rounds is {args.rounds}; s/round needs at least 2")
    if args.cluster and args.cluster < 3:
        p.error("--cluster needs at least 3 primaries")
    if (args.blob_store == "s3") != bool(args.s3_bucket):
        p.error("--blob-store s3 and --s3-bucket go together")
    if not 1 <= args.partitions <= 64 or not 0 <= args.cell < args.partitions:
        p.error(f"need 1 <= --partitions <= 64 and 0 <= --cell < --partitions; got {args.partitions}, {args.cell}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop_on_sigterm()
    # A shell without job control starts background commands with SIGINT ignored; Ctrl-C and
    # `kill -INT` must still stop the run (and, through the finally blocks, the deployment).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    load_before = os.getloadavg()
    try:
        ours = run_ours(args)
        logger.info("ours: %s s/round", seconds(ours["s_per_round"]))
        floor = None
        if args.floor:
            floor = measure_floor(agents=args.agents, params=args.params, layers=args.layers, rounds=args.rounds,
                                  folder=args.data_dir.resolve() / "floor", log=logger.info)
            logger.info("data-path floor: %s s/round", seconds(floor["s_per_round"]))
        flower = run_flower(args) if args.flower and flower_available() else None
        if args.flower and flower is None:
            logger.warning("flwr does not import: no Flower run")
    except BenchmarkFailed as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; the deployment and the agents were stopped\n")
        return 130
    context = {"loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
               "flwr": importlib.metadata.version("flwr") if flower is not None else None}
    sys.stdout.write(f"context: {json.dumps(context)}\n{report(args, ours, flower, floor)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv, "args": {k: str(v) for k, v in vars(args).items()},
                                         "context": context, "ours": ours, "flower": flower, "floor": floor,
                                         "ours_over_flower": ratio(ours, flower)}, indent=2))
    return 0


def ratio(ours: dict[str, Any], flower: dict[str, Any] | None) -> float | None:
    if flower is None or not ours["s_per_round"] or not flower["s_per_round"]:
        return None
    return float(ours["s_per_round"] / flower["s_per_round"])


if __name__ == "__main__":
    sys.exit(main())
