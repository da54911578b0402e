#!/usr/bin/env python3
"""System test: run the whole system end to end and print a pass/fail report.

Usage: .venv/bin/python scripts/test-federated-system.py [--rounds N] [--agents-per-org N]
           [--timeout S] [--json report.json]
           [--url DASHBOARD_URL --redis-url URL --api-key KEY | --deployment deployment.json]

By default it deploys the system itself (the launcher, on free ports, in a temporary data
folder); with --url/--redis-url/--api-key (the bootstrap key; default $FL_API_KEY) or
--deployment (a launcher's <data_dir>/run/deployment.json) it tests that deployment instead.

Two organisations are created with the bootstrap key, each with a project, admin, operator
and viewer keys and a join token; each trains the digits softmax model with its own agents of
every kind (bus agents, a Flower NumPyClient when flwr is installed, a plain-HTTP sync client).
Then it checks completion and accuracy, contributors, versions and metrics, every process's
Prometheus endpoint, isolation between the organisations, bad credentials, malformed and
oversized syncs (each refusal must change nothing). One line per check, then "N passed,
M failed"; the exit status is 1 when any check failed, 2 when the deployment could not be used.
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
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import numpy as np
import redis.asyncio as aioredis
import websockets

from agents.data import ClientData, Dataset, make_client_datasets
from agents.fleet import Endpoints, Membership, OrgFleet, flower_available
from agents.http_sync import SyncFailed, sync_once
from federated_learning.bus.connection import connect, keys_for
from federated_learning.bus.embedded import free_port
from federated_learning.config import ConfigError, load_settings
from federated_learning.deploy.local import DeploymentFailed, LocalDeployment, stop_on_sigterm
from federated_learning.deploy.probes import (
    bus_snapshot,
    differences,
    fl_samples,
    metric_total,
    training_snapshot,
)
from federated_learning.deploy.report import CheckReport
from federated_learning.presets import create_trainer
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.tensors import decode_layers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MAX_BLOB_BYTES = 256 * 1024 * 1024
EMBEDDED_MAX_BLOB_BYTES = 1 << 20
MIN_ACCURACY = 0.8
LOCAL = {"epochs": 5, "batch_size": 16, "learning_rate": 0.5}
EXPIRING_KEY_S = 1.0
WS_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 20.0
REGISTER_TIMEOUT_S = 30.0
POLL_S = 0.3
TERMINAL = ("completed", "failed", "stopped")
# A plain-HTTP client is alive (and awaited by a round) only for heartbeat_timeout_s after its
# last sync; 30 s spans a round even on a loaded 2-core machine.
EMBEDDED_ENV = {
    "FL_METRICS_PORT_BASE": "0", "FL_HEARTBEAT_INTERVAL_S": "0.5", "FL_HEARTBEAT_TIMEOUT_S": "30",
    "FL_ROUND_DEADLINE_S": "20", "FL_CLAIM_IDLE_MS": "2000", "FL_MIN_CLIENTS_PER_ROUND": "2",
    "FL_MAX_CLIENTS_PER_ROUND": "20", "FL_DEFAULT_PRIVACY_LEVEL": "none", "FL_REDIS_URL": "",
    "FL_API_KEY": "", "FL_AGGREGATOR_WORKERS": "1", "FL_MAX_CONCURRENT_TRAININGS": "3",
    "FL_MAX_BLOB_BYTES": str(EMBEDDED_MAX_BLOB_BYTES), "FL_REQUIRE_JOIN_TOKEN": "false",
}


class SetupFailed(RuntimeError):
    """A step the later checks depend on failed (already reported)."""


@dataclass(frozen=True)
class Target:
    """The deployment under test."""

    dashboard_url: str
    redis_url: str
    api_key: str
    key_prefix: str = "fl"
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES
    metrics_host: str = "127.0.0.1"


@dataclass
class Org:
    """One organisation of the test: its ids, keys by role, join token, fleet and training."""

    org_id: str
    project_id: str = "main"
    keys: dict[str, str] = field(default_factory=dict)
    join_token: str = ""
    fleet: OrgFleet | None = None
    training_id: str = ""

    @property
    def agents(self) -> OrgFleet:
        assert self.fleet is not None
        return self.fleet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds of each training")
    p.add_argument("--agents-per-org", type=int, default=3,
                   help="bus agents per organisation, besides its Flower agent and HTTP client")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds the trainings may take")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--min-accuracy", type=float, default=MIN_ACCURACY,
                   help="accuracy floor of each final model")
    p.add_argument("--url", default=None, help="dashboard URL of a running deployment")
    p.add_argument("--redis-url", default=None, help="its Redis URL (with the services' credentials)")
    p.add_argument("--api-key", default=None, help="its bootstrap key (default $FL_API_KEY)")
    p.add_argument("--key-prefix", default="fl", help="its redis_key_prefix (with --url)")
    p.add_argument("--max-blob-bytes", type=int, default=DEFAULT_MAX_BLOB_BYTES,
                   help="its max_blob_bytes (with --url or --deployment), for the oversized sync")
    p.add_argument("--deployment", type=Path, default=None, metavar="FILE", help="a launcher's run/deployment.json")
    p.add_argument("--metrics-host", default="127.0.0.1", help="where the services' metrics ports listen")
    p.add_argument("--keep-data", action="store_true", help="keep the embedded deployment's data folder")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.agents_per_org < 1 or args.timeout <= 0:
        p.error("--rounds and --agents-per-org must be >= 1 and --timeout > 0")
    if args.url and args.deployment:
        p.error("give --url or --deployment, not both")
    if args.url and not (args.redis_url and (args.api_key or os.environ.get("FL_API_KEY"))):
        p.error("--url needs --redis-url and --api-key (or $FL_API_KEY)")
    return args


def given_target(args: argparse.Namespace) -> Target | None:
    """The deployment named on the command line, or None (deploy one)."""
    if args.deployment is not None:
        data = json.loads(args.deployment.read_text())
        return Target(data["dashboard_url"], data["redis_url"], args.api_key or data["api_key"],
                      data.get("key_prefix", "fl"), args.max_blob_bytes, args.metrics_host)
    if args.url:
        return Target(args.url.rstrip("/"), args.redis_url, args.api_key or os.environ["FL_API_KEY"],
                      args.key_prefix, args.max_blob_bytes, args.metrics_host)
    return None


def embedded_deployment(data_dir: Path) -> LocalDeployment:
    """The launcher on free ports in ``data_dir``, with short heartbeats and a 1 MiB blob limit."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "fl-numba-cache"))
    env = {**EMBEDDED_ENV, "FL_DATA_DIR": str(data_dir), "FL_DASHBOARD_PORT": str(free_port()),
           "FL_REDIS_EMBEDDED_PORT": str(free_port()), "FL_CPU_CORES": str(os.cpu_count() or 1)}
    os.environ.update(env)
    settings = load_settings(ROOT / "config.json")
    return LocalDeployment(settings, ROOT / "config.json", data_dir, env)


# -- the scenario ---------------------------------------------------------------------


class SystemTest:
    """The checks, in order, against one deployment."""

    def __init__(self, target: Target, args: argparse.Namespace, report: CheckReport) -> None:
        self.target = target
        self.args = args
        self.report = report
        self.keys = Keys(target.key_prefix)
        run = uuid.uuid4().hex[:6]
        self.orgs = [Org(f"sys-a-{run}"), Org(f"sys-b-{run}")]
        self.workdir = Path(tempfile.mkdtemp(prefix="fl-system-test-"))
        self.http: httpx.AsyncClient
        self.redis: aioredis.Redis
        self.test_set: Dataset

    async def run(self) -> None:
        self.redis = await connect(self.target.redis_url, attempts=3)
        self.keys = keys_for(self.redis, self.target.key_prefix)  # a cluster's layout, when it is one
        try:
            async with httpx.AsyncClient(base_url=self.target.dashboard_url, timeout=60.0) as self.http:
                await self._scenario()
        finally:
            await self.redis.aclose()
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def _scenario(self) -> None:
        for org in self.orgs:
            await self.set_up_org(org)
        rounds_before = await self.rounds_counter()
        self.test_set = await self.train()
        await self.check_results()
        await self.check_prometheus(rounds_before)
        await self.check_isolation()
        await self.check_credentials()
        await self.check_bad_syncs()

    # -- REST helpers -----------------------------------------------------------------

    async def call(self, method: str, path: str, key: str | None, **kwargs: Any) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), **({"X-API-Key": key} if key else {})}
        return await self.http.request(method, path, headers=headers, **kwargs)

    def expect(self, name: str, response: httpx.Response, code: int) -> dict[str, Any]:
        """Report ``name``; raise SetupFailed unless ``response`` has status ``code``."""
        ok = response.status_code == code
        self.report.check(name, [] if ok else [(f"answered {response.status_code} (expected {code}): "
                                               f"{response.text[:200]}")])
        if not ok:
            raise SetupFailed(name)
        body: dict[str, Any] = response.json()
        return body

    # -- setup ------------------------------------------------------------------------

    async def set_up_org(self, org: Org) -> None:
        """Organisation (bootstrap key), admin key, project, operator and viewer keys, join token."""
        root = self.target.api_key
        self.expect(f"{org.org_id}: bootstrap key creates the organisation",
                    await self.call("POST", "/api/orgs", root, json={"org_id": org.org_id}), 201)
        org.keys["admin"] = self.expect(
            f"{org.org_id}: bootstrap key creates an admin key",
            await self.call("POST", f"/api/orgs/{org.org_id}/keys", root,
                            json={"name": "admin", "role": "admin"}), 201)["api_key"]
        self.expect(f"{org.org_id}: admin creates project '{org.project_id}'",
                    await self.call("POST", f"/api/orgs/{org.org_id}/projects", org.keys["admin"],
                                    json={"project_id": org.project_id}), 201)
        for role in ("operator", "viewer"):
            org.keys[role] = self.expect(
                f"{org.org_id}: admin creates the {role} key",
                await self.call("POST", f"/api/orgs/{org.org_id}/keys", org.keys["admin"],
                                json={"name": role, "role": role}), 201)["api_key"]
        org.join_token = self.expect(
            f"{org.org_id}: operator issues a join token for '{org.project_id}'",
            await self.call("POST", "/api/join-tokens", org.keys["operator"],
                            json={"project_id": org.project_id, "label": "system test"}), 201)["token"]

    def endpoints(self) -> Endpoints:
        return Endpoints(redis_url=self.target.redis_url, dashboard_url=self.target.dashboard_url,
                         key_prefix=self.target.key_prefix)

    def shards(self) -> tuple[list[list[ClientData]], Dataset]:
        per_org = self.args.agents_per_org + 1 + flower_available()
        clients, test_set = make_client_datasets(per_org * len(self.orgs), "iid", seed=0)
        return [clients[i * per_org:(i + 1) * per_org] for i in range(len(self.orgs))], test_set

    # -- training ---------------------------------------------------------------------

    async def train(self) -> Dataset:
        """Start each organisation's training, then its HTTP client (whose first sync, while the
        training waits for agents, registers it, so every round waits for it), then its bus and
        Flower agents; follow both trainings to the end."""
        shards, test_set = self.shards()
        for org, org_shards in zip(self.orgs, shards, strict=True):
            membership = Membership(org.org_id, org.project_id, org.join_token, org.keys["operator"])
            org.fleet = OrgFleet(membership, self.endpoints(), org_shards, flower=flower_available(),
                                 workdir=self.workdir)
        try:
            for org in self.orgs:
                await self.start_training(org)
                org.agents.follow_over_http(org.training_id)
            for org in self.orgs:
                registered = await org.agents.http_registered(REGISTER_TIMEOUT_S)
                self.report.check(f"{org.org_id}: HTTP client synced before the bus agents joined",
                                  [] if registered else [(f"no sync in {REGISTER_TIMEOUT_S:.0f}s; "
                                                         f"it saw {org.agents.http.seen}")])
            await asyncio.gather(*(org.agents.start() for org in self.orgs))
            await self.wait_for_trainings()
        finally:
            await asyncio.gather(*(org.agents.stop() for org in self.orgs))
        return test_set

    def training_body(self, org: Org, project_id: str, name: str) -> dict[str, Any]:
        contributors = org.agents.inbox_agents + 1  # the HTTP client too: each round waits for it
        return {"training_id": name, "project_id": project_id, "name": f"system test {name}",
                "dataset": "digits", "model": {"trainer": "softmax", "num_features": 64, "num_classes": 10},
                "rounds": self.args.rounds, "clients_per_round": contributors, "min_clients": 2,
                "round_deadline_s": 20, "local": LOCAL, "privacy_level": "none"}

    async def start_training(self, org: Org) -> None:
        body = self.expect(f"{org.org_id}: operator starts a training",
                           await self.call("POST", "/api/training/start", org.keys["operator"],
                                           json=self.training_body(org, org.project_id, "digits")), 202)
        org.training_id = str(body["training_id"])

    async def wait_for_trainings(self) -> None:
        deadline = time.monotonic() + self.args.timeout
        pending = {org.training_id for org in self.orgs}
        while pending and time.monotonic() < deadline:
            for training_id in sorted(pending):
                status = await self.status(training_id)
                if status is not None and status["status"] in TERMINAL:
                    pending.discard(training_id)
            await asyncio.sleep(POLL_S)

    async def status(self, training_id: str, key: str | None = None) -> dict[str, Any] | None:
        response = await self.call("GET", f"/api/training/{training_id}/status", key or self.target.api_key)
        if response.status_code != 200:
            return None
        status: dict[str, Any] = response.json()
        return status

    # -- results ----------------------------------------------------------------------

    async def check_results(self) -> None:
        """Per organisation: completion, ownership, accuracy, contributors, versions and metrics."""
        for org in self.orgs:
            status = await self.status(org.training_id) or {}
            self.check_training_identity(org, status)
            self.report.check(f"{org.org_id}: training completed", [] if status.get("status") == "completed" else
                              [(f"status {status.get('status')!r} ({status.get('reason', '')}) after "
                               f"{self.args.timeout:.0f}s")])
            versions = (await self.call("GET", f"/api/training/{org.training_id}/versions", org.keys["viewer"])).json()
            metrics = (await self.call("GET", f"/api/training/{org.training_id}/metrics", org.keys["viewer"])).json()
            await self.check_accuracy(org, status)
            self.check_contributors(org, versions)
            self.check_history(org, versions, metrics)

    def check_training_identity(self, org: Org, status: dict[str, Any]) -> None:
        problems = []
        if not org.training_id.startswith(f"{org.org_id}."):
            problems.append(f"id '{org.training_id}' lacks the prefix '{org.org_id}.'")
        if (status.get("org_id"), status.get("project_id")) != (org.org_id, org.project_id):
            problems.append(f"recorded as {status.get('org_id')}/{status.get('project_id')}")
        self.report.check(f"{org.org_id}: training belongs to {org.org_id}/{org.project_id}", problems)

    async def check_accuracy(self, org: Org, status: dict[str, Any]) -> None:
        """The final version's accuracy on the global test set and its federated evaluation."""
        floor = self.args.min_accuracy
        federated = (status.get("final_evaluation") or {}).get("accuracy")
        version = status.get("current_version")
        test = None
        if version is not None:
            model = await self.call("GET", f"/api/training/{org.training_id}/versions/{version}/model",
                                    org.keys["viewer"])
            if model.status_code == 200:
                test = test_accuracy(model.content, self.test_set)
        problems = [f"{label} accuracy {value} below {floor}" for label, value in
                    (("federated", federated), ("test-set", test)) if value is None or value < floor]
        self.report.check(f"{org.org_id}: accuracy above {floor}", problems,
                          f"federated {federated:.3f}, test set {test:.3f}" if not problems else "")

    def check_contributors(self, org: Org, versions: list[dict[str, Any]]) -> None:
        """Every contributor is one of the organisation's agents, and every kind contributed."""
        contributors = {agent for record in versions for agent in record.get("contributors", [])}
        by_kind = org.agents.ids_by_kind
        own = {agent for ids in by_kind.values() for agent in ids}
        problems = [f"foreign contributors {sorted(contributors - own)}"] if contributors - own else []
        problems += [f"no {kind} agent contributed (expected one of {ids})" for kind, ids in by_kind.items()
                     if ids and not contributors & set(ids)]
        if problems:
            problems.append(f"HTTP client's syncs: {org.agents.http.history}; it saw {org.agents.http.seen}")
        kinds = ", ".join(f"{kind} {len(contributors & set(ids))}" for kind, ids in by_kind.items())
        self.report.check(f"{org.org_id}: contributors are its own agents, of every kind", problems, kinds)

    def check_history(self, org: Org, versions: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> None:
        rounds = self.args.rounds
        problems = []
        if [v.get("version") for v in versions] != list(range(rounds + 1)):
            problems.append(f"versions {[v.get('version') for v in versions]}; expected 0..{rounds}")
        if [m.get("round") for m in metrics] != list(range(1, rounds + 1)):
            problems.append(f"metrics of rounds {[m.get('round') for m in metrics]}; expected 1..{rounds}")
        if any(m.get("eval_accuracy") is None for m in metrics):
            problems.append("a round without a federated evaluation")
        self.report.check(f"{org.org_id}: versions and round metrics recorded", problems)

    # -- Prometheus -------------------------------------------------------------------

    async def scrape_all(self) -> dict[str, str]:
        """Every process's metrics text by ``service/instance`` (from the health records)."""
        health = (await self.http.get("/api/system/health")).json()
        scraped = {}
        for service, records in sorted(health["services"].items()):
            for record in records:
                port = record.get("metrics_port")
                url = (f"{self.target.dashboard_url}/metrics" if service == "dashboard"
                       else f"http://{self.target.metrics_host}:{port}/metrics")
                try:
                    scraped[f"{service}/{record.get('instance')}"] = (await self.http.get(url)).text
                except httpx.HTTPError as exc:
                    scraped[f"{service}/{record.get('instance')}"] = f"unreachable: {exc}"
        return scraped

    async def rounds_counter(self) -> float:
        return sum(metric_total(text, "fl_rounds_completed_total")
                   for name, text in (await self.scrape_all()).items() if name.startswith("coordinator/"))

    async def check_prometheus(self, rounds_before: float) -> None:
        scraped = await self.scrape_all()
        expected = {"coordinator", "aggregator", "privacy", "versions", "monitor", "dashboard"}
        missing = expected - {name.split("/")[0] for name in scraped}
        self.report.check("every service reports a metrics endpoint", [f"missing {sorted(missing)}"] if missing else [],
                          f"{len(scraped)} processes")
        for name, exposition in scraped.items():
            self.report.check(f"prometheus {name} serves fl_ metrics",
                              [] if fl_samples(exposition) else [f"no fl_ sample in {exposition[:120]!r}"],
                              f"{len(fl_samples(exposition))} samples")
        moved = sum(metric_total(text, "fl_rounds_completed_total")
                    for name, text in scraped.items() if name.startswith("coordinator/")) - rounds_before
        wanted = self.args.rounds * len(self.orgs)
        self.report.check("prometheus round counter moved", [] if moved >= wanted else
                          [f"fl_rounds_completed_total rose by {moved:g}; expected >= {wanted}"], f"+{moved:g}")

    # -- refusals -----------------------------------------------------------------------

    async def snapshot(self, training_ids: list[str]) -> dict[str, Any]:
        root = httpx.AsyncClient(base_url=self.target.dashboard_url, headers={"X-API-Key": self.target.api_key})
        async with root:
            trainings = {tid: await training_snapshot(root, tid) for tid in training_ids}
        return {**trainings, **await bus_snapshot(self.redis, self.keys)}

    async def expect_refusal(self, name: str, code: int, training_ids: list[str],
                             request: Callable[[], Awaitable[httpx.Response]]) -> None:
        """``request`` is answered ``code`` with a ``detail`` and leaves the state as it was."""
        before = await self.snapshot(training_ids)
        response = await request()
        after = await self.snapshot(training_ids)
        problems = []
        if response.status_code != code:
            problems.append(f"answered {response.status_code} (expected {code}): {response.text[:200]}")
        elif not error_detail(response):
            problems.append("the answer carries no 'detail'")
        if before != after:
            problems.append(f"state changed: {differences(before, after)}")
        self.report.check(name, problems, f"{code}: {error_detail(response)[:80]}")

    async def check_isolation(self) -> None:
        a, b = self.orgs
        target = b.training_id
        self.report.check(f"{a.org_id} viewer reads its own training",
                          [] if await self.status(a.training_id, a.keys["viewer"]) else ["not readable"])
        await self.expect_refusal(f"{a.org_id} viewer cannot read {b.org_id}'s training", 403, [target],
                                  lambda: self.call("GET", f"/api/training/{target}/status", a.keys["viewer"]))
        await self.expect_refusal(f"{a.org_id} operator cannot stop {b.org_id}'s training", 403, [target],
                                  lambda: self.call("POST", f"/api/training/{target}/stop", a.keys["operator"]))
        await self.expect_refusal(f"{a.org_id} operator cannot roll back {b.org_id}'s training", 403, [target],
                                  lambda: self.call("POST", f"/api/training/{target}/rollback", a.keys["operator"],
                                                    json={"version": 0}))
        await self.check_listings(a, b)
        await self.check_subscription(a, b)
        await self.check_cross_org_sync(b, a)

    async def check_listings(self, a: Org, b: Org) -> None:
        listed = [t["training_id"] for t in (await self.call("GET", "/api/trainings", a.keys["viewer"])).json()]
        agents = [r["agent_id"] for r in (await self.call("GET", "/api/agents", a.keys["viewer"])).json()]
        own = {agent for ids in a.agents.ids_by_kind.values() for agent in ids}
        problems = [] if listed == [a.training_id] else [f"trainings listed: {listed}"]
        problems += [] if set(agents) == own else [(f"agents listed beyond its own: {sorted(set(agents) - own)}, "
                                                   f"own missing: {sorted(own - set(agents))}")]
        self.report.check(f"{a.org_id} listings show only its own trainings and agents", problems)

    async def check_subscription(self, a: Org, b: Org) -> None:
        """Over the WebSocket, a's viewer may follow its training and is refused b's (403)."""
        before = await self.snapshot([b.training_id])
        url = self.target.dashboard_url.replace("http", "ws", 1) + f"/ws/system-test?api_key={a.keys['viewer']}"
        problems = []
        async with websockets.connect(url) as socket:
            own = await ws_command(socket, {"action": "subscribe", "training_id": a.training_id})
            if own.get("type") != "subscribed":
                problems.append(f"own training: {own}")
            other = await ws_command(socket, {"action": "subscribe", "training_id": b.training_id})
            if other.get("type") != "error" or other.get("code") != 403:
                problems.append(f"{b.org_id}'s training: {other}")
        if before != await self.snapshot([b.training_id]):
            problems.append("state changed")
        self.report.check(f"{a.org_id} viewer cannot subscribe to {b.org_id}'s training", problems, "error 403")

    async def check_cross_org_sync(self, b: Org, a: Org) -> None:
        """b's HTTP sync client (agents.http_sync.sync_once with b's key) aimed at a's training."""
        client = b.agents.http
        settings = client.settings(a.training_id)
        model = await self.call("GET", f"/api/training/{b.training_id}/versions/0/model", b.keys["viewer"])
        settings.local_model_path.parent.mkdir(parents=True, exist_ok=True)
        settings.local_model_path.write_bytes(model.content)
        before = await self.snapshot([a.training_id])
        outcome = await asyncio.to_thread(attempt_sync, settings)
        after = await self.snapshot([a.training_id])
        problems = [] if "(403)" in outcome else [f"the sync ended with: {outcome[:200]}"]
        if before != after:
            problems.append(f"state changed: {differences(before, after)}")
        self.report.check(f"{b.org_id} HTTP sync client cannot post into {a.org_id}'s training", problems,
                          outcome[:80])

    async def check_credentials(self) -> None:
        a = self.orgs[0]
        path = f"/api/training/{a.training_id}/status"
        ids = [a.training_id]
        await self.expect_refusal("missing API key is refused", 401, ids, lambda: self.call("GET", path, None))
        wrong = "flk_" + "0" * 12 + "_" + "x" * 43
        await self.expect_refusal("wrong API key is refused", 401, ids, lambda: self.call("GET", path, wrong))
        revoked = await self.usable_key(a, "revoked", None)
        if revoked is not None:
            key, key_id = revoked
            await self.call("DELETE", f"/api/orgs/{a.org_id}/keys/{key_id}", a.keys["admin"])
            await self.expect_refusal("revoked API key is refused", 401, ids, lambda: self.call("GET", path, key))
        expiring = await self.usable_key(a, "expiring", EXPIRING_KEY_S)
        if expiring is not None:
            await asyncio.sleep(EXPIRING_KEY_S + 0.2)
            await self.expect_refusal("expired API key is refused", 401, ids,
                                      lambda: self.call("GET", path, expiring[0]))
        await self.expect_refusal("viewer key cannot stop a training", 403, ids,
                                  lambda: self.call("POST", f"/api/training/{a.training_id}/stop", a.keys["viewer"]))
        await self.check_websocket_wrong_key()

    async def usable_key(self, org: Org, name: str, expires_in_s: float | None) -> tuple[str, str] | None:
        """A new viewer key that works now (reported as a check), or None."""
        body = {"name": name, "role": "viewer", **({"expires_in_s": expires_in_s} if expires_in_s else {})}
        created = await self.call("POST", f"/api/orgs/{org.org_id}/keys", org.keys["admin"], json=body)
        works = created.status_code == 201 and await self.status(org.training_id, created.json()["api_key"])
        self.report.check(f"a new '{name}' viewer key works before it is {name.replace('ing', 'ed')}",
                          [] if works else [f"creating answered {created.status_code}; or it could not read"])
        return (created.json()["api_key"], created.json()["key_id"]) if works else None

    async def check_websocket_wrong_key(self) -> None:
        url = self.target.dashboard_url.replace("http", "ws", 1) + "/ws/system-test?api_key=wrong"
        code = None
        try:
            async with websockets.connect(url) as socket:
                await asyncio.wait_for(socket.recv(), WS_TIMEOUT_S)
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
        self.report.check("WebSocket with a wrong key is closed with 4401",
                          [] if code == 4401 else [f"closed with {code}"])

    async def check_bad_syncs(self) -> None:
        """Malformed and oversized syncs into a paused probe training (in a project with no agents)."""
        a = self.orgs[0]
        probe = await self.start_probe(a)
        if probe is None:
            return
        for name, code, kwargs in bad_sync_requests(probe, self.target.max_blob_bytes):
            await self.expect_refusal(f"sync with {name} is refused", code, [probe],
                                      partial(self.call, "POST", "/sync_model", a.keys["operator"], **kwargs))
        await self.stop_probe(a, probe)

    async def start_probe(self, org: Org) -> str | None:
        await self.call("POST", f"/api/orgs/{org.org_id}/projects", org.keys["admin"], json={"project_id": "probe"})
        response = await self.call("POST", "/api/training/start", org.keys["operator"],
                                   json=self.training_body(org, "probe", "probe"))
        probe = response.json().get("training_id") if response.status_code == 202 else None
        status = await self.wait_status(probe, ("paused",)) if probe else None
        self.report.check("probe training (no agents) is paused", [] if status == "paused" else
                          [f"start answered {response.status_code}; status {status}"])
        return probe if status == "paused" else None

    async def stop_probe(self, org: Org, probe: str) -> None:
        response = await self.call("POST", f"/api/training/{probe}/stop", org.keys["operator"])
        status = await self.wait_status(probe, ("stopped",)) if response.status_code == 202 else None
        self.report.check(f"{org.org_id} operator stops its own training", [] if status == "stopped" else
                          [f"stop answered {response.status_code}; status {status}"])

    async def wait_status(self, training_id: str, wanted: tuple[str, ...]) -> str | None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            status = (await self.status(training_id) or {}).get("status")
            if status in wanted:
                break
            await asyncio.sleep(POLL_S)
        return status


# -- helpers ------------------------------------------------------------------------------


def test_accuracy(model: bytes, test_set: Dataset) -> float:
    """Accuracy of a softmax model (safetensors) on the global test set no agent holds."""
    trainer = create_trainer("softmax", num_features=64, num_classes=10)
    weights = decode_layers(model, max_bytes=1 << 26)
    return float(trainer.evaluate({k: v.astype(np.float32) for k, v in weights.items()},
                                  test_set.x, test_set.y).accuracy)


def error_detail(response: httpx.Response) -> str:
    """The ``detail`` of an error answer ('' when there is none)."""
    try:
        return str(response.json().get("detail") or "")
    except ValueError:
        return ""


def attempt_sync(settings: Any) -> str:
    """Run the HTTP client's ``sync_once``; what happened, in words ('synced' or the refusal)."""
    with httpx.Client(timeout=30.0) as client:
        try:
            sync_once(settings, client, sleep=lambda _s: None)
        except SyncFailed as exc:
            return str(exc)
    return "synced"


async def ws_command(socket: websockets.ClientConnection, command: dict[str, str]) -> dict[str, Any]:
    """Send ``command``; the next answer to it (``subscribed``/``error``), skipping pushed events."""
    await socket.send(json.dumps(command))
    deadline = time.monotonic() + WS_TIMEOUT_S
    while time.monotonic() < deadline:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(socket.recv(), WS_TIMEOUT_S))
        if message.get("type") in ("subscribed", "unsubscribed", "error"):
            return message
    return {"type": "timeout"}


def bad_sync_requests(training_id: str, max_blob_bytes: int) -> list[tuple[str, int, dict[str, Any]]]:
    """(what is wrong, expected status, request arguments) of each refused sync (docs: 422 and 413)."""
    binary = {"Content-Type": "application/octet-stream", "X-Training-Id": training_id, "X-Client-Id": "bad"}
    good_bias = [0.0] * 10
    return [
        ("a body that is not JSON", 422, {"content": b'{"client_id": "bad", "weights": ',
                                          "headers": {"Content-Type": "application/json"}}),
        ("no weights", 422, {"json": {"client_id": "bad", "training_id": training_id}}),
        ("an unknown field", 422, {"json": {"client_id": "bad", "training_id": training_id, "weights": {},
                                            "extra": 1}}),
        ("a negative example count", 422, {"json": {"client_id": "bad", "training_id": training_id,
                                                    "weights": {}, "metrics": {"num_examples": -1}}}),
        ("a layer of the wrong shape", 422, {"json": {
            "client_id": "bad", "training_id": training_id,
            "weights": {"dense.weight": [[0.0] * 3] * 2, "dense.bias": good_bias}}}),
        ("an unknown layer", 422, {"json": {
            "client_id": "bad", "training_id": training_id,
            "weights": {"dense.weight": [[0.0] * 10] * 64, "dense.bias": good_bias, "extra": [1.0]}}}),
        ("a body that is not safetensors", 422, {"content": b"not a safetensors file", "headers": binary}),
        (f"a model over max_blob_bytes ({max_blob_bytes} bytes)", 413,
         {"content": b"\0" * (max_blob_bytes + 1), "headers": binary}),
    ]


async def run_checks(target: Target, args: argparse.Namespace, report: CheckReport) -> None:
    try:
        await SystemTest(target, args, report).run()
    except SetupFailed as exc:
        report.check("setup", [f"stopped after '{exc}' failed; later checks did not run"])


def run_embedded(args: argparse.Namespace, report: CheckReport) -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="fl-system-deploy-"))
    try:
        deployment = embedded_deployment(data_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop_on_sigterm()
    print(f"deploying the system in {data_dir} ...", flush=True)
    try:
        deployment.start()
        print(f"dashboard {deployment.dashboard_url}", flush=True)
        target = Target(deployment.dashboard_url, deployment.redis_url, deployment.api_key,
                        deployment.settings.redis_key_prefix, deployment.settings.max_blob_bytes, args.metrics_host)
        asyncio.run(run_checks(target, args, report))
    except DeploymentFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        deployment.stop()
        if not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = CheckReport()
    target = given_target(args)
    if target is None:
        status = run_embedded(args, report)
    else:
        asyncio.run(run_checks(target, args, report))
        status = 0
    report.finish()
    if args.json:
        report.write_json(args.json)
    if status:
        return status
    return 1 if report.failed or not report.results else 0


if __name__ == "__main__":
    sys.exit(main())
