"""Every bad input on every surface of one deployment while an honest training runs.

A seeded training of five agents runs first in a clean deployment, then again, with the same
id, in a second one while the test sends the catalogue of ``tests/e2e/bad_inputs.py``: REST
bodies, ``/sync_model`` bodies, WebSocket frames and sockets, and bus entries written with an
agent's own ACL credentials. One honest agent holds its task of round 2 until every probe has
been answered, so the probes land while that round is open, whatever the machine's speed.

Afterwards: each request got its 4xx and each bus entry its rejection (the ``rejections`` hash
and the ``input_rejected`` events hold exactly the expected counts, nothing more), no 5xx and
no traceback in any log, no process died or was restarted, the dashboard's and coordinator's
resident memory grew by less than ``RSS_GROWTH_BOUND_MB``, and the honest training committed
versions 0..3 that are byte for byte those of the clean run (same SHA-256 digests, so the same
final accuracy).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import psutil
import pytest
import redis.asyncio as aioredis
import websockets
from redis.exceptions import NoPermissionError

from agents.client import FederatedClient
from agents.data import make_client_datasets
from federated_learning.bus.connection import connect, with_credentials
from federated_learning.bus.replies import text
from federated_learning.bus.stream_ids import append
from federated_learning.dashboard.routes.live import MAX_TOPICS, TOO_MANY_CLOSE, UNAUTHORIZED_CLOSE
from federated_learning.deploy import acl
from federated_learning.deploy.access import plain_url
from federated_learning.privacy.signing import AgentKeyPair
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import (
    AgentJoined,
    Heartbeat,
    MalformedMessage,
    Task,
    decode,
    encode,
)
from federated_learning.services.runtime import read_health_records
from tests.e2e.bad_inputs import (
    WS_FRAMES,
    Attacker,
    BusProbe,
    HttpProbe,
    agent_probes,
    forged_id_probes,
    rest_probes,
    sync_probes,
    update_probes,
)
from tests.e2e.conftest import Deployment, training_body, wait_status
from tests.integration.test_bad_input import signed_by
from tests.integration.test_live_bad_input import answer

pytestmark = pytest.mark.e2e

KEYS = Keys()
AGENTS = 5
ROUNDS = 3
HONEST, OWN = "honest", "probe"
HELD = (HONEST, 2)
ATTACKER, SILENT = "mallory", "mallory-2"
"""Agents with ACL users of their own, the only ones holding the dataset 'probe': the attacker's
training selects both; the silent one never answers, so its round stays open for the probe."""
SERVICES = ("coordinator", "aggregator", "privacy", "versions", "monitor", "dashboard")
SOCKETS_PER_KEY = 4
MAX_BLOB_BYTES = 4 << 20
ENV = {"FL_MAX_SOCKETS_PER_KEY": str(SOCKETS_PER_KEY), "FL_MAX_BLOB_BYTES": str(MAX_BLOB_BYTES),
       "FL_REDIS_ACL_AGENTS": json.dumps([ATTACKER, SILENT]), "FL_HEARTBEAT_TIMEOUT_S": "30"}
"""A socket cap and a blob limit small enough to reach cheaply, and a heartbeat timeout that a
loaded machine's stalls never reach: an agent taken for dead would miss the final evaluation,
and its accuracy would differ from the clean run's for no fault of the probe. Everything else
as deployed."""
RSS_GROWTH_BOUND_MB = 32
"""The most a refused input may make the dashboard hold is one body cut at max_blob_bytes (4 MiB,
the chunked /sync_model body); the coordinator refuses a blob over that size from its length
alone. Measured on the 2-core machine: +2.7 to +3.1 MB (dashboard), +0.2 MB (coordinator). 32 MB
(eight such bodies) leaves room for first-use imports and allocator slack, and is still below what
holding the refused inputs would cost: the 10^6 JSON values parsed (~32 MB of Python floats), a
2^62-value compressed layer expanded, or the sockets and bodies of the probe kept."""
WAIT_S = 60.0
POLL_S = 0.02


class HeldAgent(FederatedClient):
    """An honest agent that keeps the task of one (training, round) until released; what it
    then trains is what it would have trained at once (its seed is the training's and the round's)."""

    def __init__(self, *args: Any, hold: tuple[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold = hold
        self.holding = asyncio.Event()
        self.released = asyncio.Event()

    async def handle_task(self, fields: dict[bytes, bytes]) -> None:
        try:
            task: Task | None = decode(Task, fields)
        except MalformedMessage:
            task = None
        if task is not None and (task.training_id, task.round) == self.hold:
            self.holding.set()
            await self.released.wait()
        await super().handle_task(fields)


def honest_body() -> dict[str, Any]:
    """Every agent every round (over_selection 1, min_clients = all): the same updates each run."""
    return training_body(ROUNDS, training_id=HONEST, clients_per_round=AGENTS, min_clients=AGENTS,
                         over_selection=1.0, round_deadline_s=300,
                         local={"epochs": 2, "batch_size": 8, "learning_rate": 0.1})


def own_body() -> dict[str, Any]:
    return training_body(1, training_id=OWN, dataset="probe", clients_per_round=2, min_clients=2,
                         over_selection=1.0, round_deadline_s=600, max_examples_per_update=1000)


@contextmanager
def deployed(folder: Path) -> Iterator[Deployment]:
    deployment = Deployment(folder / "data")
    deployment.data_dir.mkdir(parents=True)
    deployment.env.update(ENV)
    deployment.start()
    try:
        yield deployment
    finally:
        deployment.stop()


async def start_agents(deployment: Deployment, hold: tuple[str, int] | None) -> list[HeldAgent]:
    """The same five agents (ids, data, seeds) in every run; the first holds ``hold``."""
    clients, _test = make_client_datasets(AGENTS, "iid", 0)
    agents: list[HeldAgent] = []
    for data in clients:
        agent = HeldAgent(f"agent-{data.client_id:03d}", redis_url=deployment.redis_url, heartbeat_interval_s=0.5,
                          seed=0, hold=hold if not agents else None)
        agent.add_dataset("digits", data.train.x, data.train.y, x_eval=data.eval.x, y_eval=data.eval.y)
        agents.append(agent)
    await asyncio.gather(*(agent.initialize() for agent in agents))
    return agents


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        await asyncio.sleep(POLL_S)


@dataclass(frozen=True)
class Outcome:
    """What the honest training committed: (version, round, SHA-256) of each version, and the
    final evaluation's accuracy."""

    versions: list[tuple[int, int, str]]
    accuracy: float


async def honest_outcome(http: httpx.AsyncClient) -> Outcome:
    status = await wait_status(http, HONEST, {"completed", "failed", "stopped"}, timeout_s=WAIT_S)
    assert status["status"] == "completed", status["reason"]
    versions = (await http.get(f"/api/training/{HONEST}/versions")).json()
    return Outcome([(v["version"], v["round"], v["model_digest"]) for v in versions],
                   status["final_evaluation"]["accuracy"])


async def clean_run(folder: Path) -> Outcome:
    with deployed(folder) as deployment:
        agents = await start_agents(deployment, hold=None)
        try:
            async with deployment.client() as http:
                started = await http.post("/api/training/start", json=honest_body())
                assert started.status_code == 202, started.text
                return await honest_outcome(http)
        finally:
            await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)


# -- the state of the deployment's processes -------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """Pid of every service instance, resident memory (KiB) of the dashboard and the
    coordinator, and the bus server's run id (a restarted server has another)."""

    pids: dict[str, int]
    rss_kib: dict[str, int]
    valkey_run_id: str


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


async def processes(redis: aioredis.Redis) -> Processes:
    pids = {f"{r['service']}/{r['instance']}": int(r["pid"]) for r in await read_health_records(redis, KEYS)}
    rss = {service: vm_rss_kib(pids[f"{service}/0"]) for service in ("dashboard", "coordinator")}
    return Processes(pids, rss, str((await redis.info("server"))["run_id"]))


def assert_no_process_died_or_restarted(deployment: Deployment, before: Processes, after: Processes) -> None:
    assert deployment.process is not None and deployment.process.poll() is None, deployment.log_tail()
    assert after.pids == before.pids, (before.pids, after.pids)
    for name, pid in after.pids.items():
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, name
    assert after.valkey_run_id == before.valkey_run_id
    launcher_log = (deployment.data_dir.parent / "deploy.log").read_text()
    assert "restarting in" not in launcher_log, launcher_log[-3000:]
    for log in sorted((deployment.data_dir / "logs").glob("*.log")):
        assert "Traceback" not in log.read_text(), f"{log.name}:\n{log.read_text()[-3000:]}"


# -- the attacker ----------------------------------------------------------------------------------


def agent_login(deployment: Deployment, agent_id: str) -> str:
    user = acl.agent_user_name(KEYS, agent_id)
    return with_credentials(plain_url(deployment.redis_url), user,
                            acl.password_for(deployment.data_dir, user, create=False))


async def keep_alive(members: list[tuple[aioredis.Redis, str, AgentKeyPair]]) -> None:
    while True:
        for redis, agent_id, key in members:
            await append(redis, KEYS.agent_stream, encode(signed_by(Heartbeat(agent_id=agent_id), key)))
        await asyncio.sleep(0.5)


@asynccontextmanager
async def attacking(deployment: Deployment, victim_agent: str) -> AsyncIterator[Attacker]:
    """The attacker and its silent partner, each logged in as its own ACL user, joined with the
    dataset 'probe' and kept alive by signed heartbeats."""
    own = await connect(agent_login(deployment, ATTACKER), attempts=3)
    silent = await connect(agent_login(deployment, SILENT), attempts=3)
    attacker = Attacker(ATTACKER, AgentKeyPair.generate(), own, OWN, HONEST, HELD[1], victim_agent)
    members = [(own, ATTACKER, attacker.key), (silent, SILENT, AgentKeyPair.generate())]
    for redis, agent_id, key in members:
        joined = AgentJoined(agent_id=agent_id, datasets={"probe": 100}, public_key=key.public_key_bytes.hex())
        await append(redis, KEYS.agent_stream, encode(signed_by(joined, key)))
    beating = asyncio.create_task(keep_alive(members))
    try:
        yield attacker
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        await asyncio.gather(own.aclose(), silent.aclose())


async def start_trainings(http: httpx.AsyncClient) -> None:
    """The honest training, and the attacker's own, whose only round waits for the silent agent."""
    for body in (honest_body(), own_body()):
        started = await http.post("/api/training/start", json=body)
        assert started.status_code == 202, started.text

    async def attacker_selected() -> bool:
        response = await http.get(f"/api/training/{OWN}/status")
        status = response.json() if response.status_code == 200 else {}
        return bool(status.get("phase") == "collecting" and status.get("selected") == [ATTACKER, SILENT])

    await wait_until(attacker_selected, f"training '{OWN}' asking {ATTACKER} and {SILENT}")


# -- the probes --------------------------------------------------------------------------------------


async def raw_answer(port: int, head: str, body: bytes) -> tuple[int, str]:
    """Send ``head`` and ``body`` on a plain socket; the status and the whole body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        headers = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)).split(b"\r\n")
        lengths = [int(line.split(b":")[1]) for line in headers if line.lower().startswith(b"content-length:")]
        content = await asyncio.wait_for(reader.readexactly(lengths[0]) if lengths else reader.read(), WAIT_S)
    finally:
        writer.close()
    return int(headers[0].split()[1]), content.decode(errors="replace")


async def send_http(probe: HttpProbe, http: httpx.AsyncClient, port: int) -> tuple[int, str]:
    """The status and text of the answer to ``probe``."""
    if probe.raw_head is not None:
        return await raw_answer(port, probe.raw_head, probe.body)

    async def chunked() -> AsyncIterator[bytes]:
        for chunk in probe.chunks:
            yield chunk

    response = await http.post(probe.path, content=chunked() if probe.chunks else probe.body,
                               headers=dict(probe.headers))
    return response.status_code, response.text


async def probe_http(deployment: Deployment, probes: list[HttpProbe]) -> list[str]:
    """Send each probe in turn; the ones answered otherwise than they must be."""
    wrong = []
    async with httpx.AsyncClient(base_url=deployment.dashboard_url, timeout=WAIT_S) as http:
        for probe in probes:
            status, text = await send_http(probe, http, deployment.dashboard_port)
            if status != probe.status or probe.words not in text:
                wrong.append(f"{probe.path} with {probe.name}: {status} {text[:300]!r}; "
                             f"expected {probe.status} saying {probe.words!r}")
    return wrong


async def close_code(socket: websockets.ClientConnection) -> int | None:
    """The code the server closes ``socket`` with; None when it sends a message instead."""
    try:
        await asyncio.wait_for(socket.recv(), timeout=WAIT_S)
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    return None


async def probe_websocket(deployment: Deployment) -> list[str]:
    """No key; bad frames; one topic too many; one socket too many. The answers that were wrong."""
    url = deployment.dashboard_url.replace("http", "ws", 1) + "/ws"
    keyed = f"?api_key={deployment.api_key}"
    wrong: list[str] = []
    async with websockets.connect(f"{url}/anonymous") as anonymous:
        if (code := await close_code(anonymous)) != UNAUTHORIZED_CLOSE:
            wrong.append(f"a socket without a key closed with {code}")
    async with websockets.connect(f"{url}/probe{keyed}") as socket:
        for frame in WS_FRAMES:
            reply = await answer(socket, frame)
            if reply["type"] != "error" or "expected" not in str(reply["message"]):
                wrong.append(f"frame {str(frame)[:40]!r}: {reply}")
        topics = [await answer(socket, json.dumps({"action": "subscribe", "training_id": f"t{i}"}))
                  for i in range(MAX_TOPICS + 1)]
        if [t["type"] for t in topics] != ["subscribed"] * MAX_TOPICS + ["error"] or topics[-1].get("code") != 429:
            wrong.append(f"topic {MAX_TOPICS + 1}: {topics[-1]}")
        held = [await websockets.connect(f"{url}/held-{i}{keyed}") for i in range(SOCKETS_PER_KEY - 1)]
        try:
            async with websockets.connect(f"{url}/one-too-many{keyed}") as extra:
                if (code := await close_code(extra)) != TOO_MANY_CLOSE:
                    wrong.append(f"socket {SOCKETS_PER_KEY + 1} of a key closed with {code}")
        finally:
            await asyncio.gather(*(s.close() for s in held))
        if (reply := await answer(socket, json.dumps({"action": "unsubscribe", "training_id": "t0"})))["type"] \
                != "unsubscribed":
            wrong.append(f"the probed socket no longer serves: {reply}")
    return wrong


async def rejection_counts(redis: aioredis.Redis) -> Counter[str]:
    return Counter({text(k): int(v) for k, v in (await redis.hgetall(KEYS.rejections)).items()})


async def rejection_events(redis: aioredis.Redis) -> Counter[str]:
    """``source:reason`` of every ``input_rejected`` event on the event stream."""
    entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", await redis.xrange(KEYS.event_stream))
    events = [json.loads(fields[b"m"]) for _id, fields in entries]
    return Counter(f"{e['data']['source_stream']}:{e['data']['reason']}" for e in events
                   if e["kind"] == "input_rejected")


async def wait_rejected(redis: aioredis.Redis, rejection: str, count: int, what: str) -> None:
    async def counted() -> bool:
        return (await rejection_counts(redis))[rejection] >= count

    await wait_until(counted, f"bus: {what} refused as {rejection}")


async def probe_bus(attacker: Attacker, observer: aioredis.Redis) -> Counter[str]:
    """Write each entry with the attacker's credentials, each refused before the next is written;
    then two commands its ACL user may not run. The rejections expected."""
    seconds, micros = await observer.time()
    probes: list[BusProbe] = [*agent_probes(attacker, time.time()),
                              *forged_id_probes(attacker, int(seconds) * 1000 + int(micros) // 1000),
                              *await update_probes(attacker, MAX_BLOB_BYTES)]
    expected: Counter[str] = Counter()
    for probe in probes:
        if probe.entry_id == "*":
            await append(attacker.redis, probe.stream, dict(probe.fields))
        else:
            await attacker.redis.xadd(probe.stream, dict(probe.fields), id=probe.entry_id)
        if probe.rejection is not None:
            expected[probe.rejection] += 1
            await wait_rejected(observer, probe.rejection, expected[probe.rejection], probe.name)
    with pytest.raises(NoPermissionError):
        await attacker.redis.xadd(KEYS.control_stream, {"m": "{}"})
    with pytest.raises(NoPermissionError):
        await attacker.redis.xrange(KEYS.inbox_stream(attacker.victim_agent))
    return expected


# -- the test ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probed:
    """What the probed deployment showed."""

    outcome: Outcome
    round_during_probe: tuple[str, int, str]
    wrong: list[str]
    expected: Counter[str]
    counted: Counter[str]
    reported: Counter[str]
    before: Processes
    after: Processes
    trainings: set[str]
    agents: set[str]
    attacker_accepted: bool
    dead_letters: dict[str, int]


async def probed_run(deployment: Deployment) -> Probed:
    observer = aioredis.Redis.from_url(deployment.redis_url)
    agents = await start_agents(deployment, hold=HELD)
    try:
        async with attacking(deployment, agents[1].agent_id) as attacker, deployment.client() as http:
            await start_trainings(http)
            await asyncio.wait_for(agents[0].holding.wait(), WAIT_S)
            before = await processes(observer)
            requests = [*rest_probes(deployment.api_key, honest_body()), *sync_probes(deployment.api_key, HONEST)]
            wrong_http, wrong_ws, bus = await asyncio.gather(
                probe_http(deployment, requests), probe_websocket(deployment), probe_bus(attacker, observer))
            during = (await http.get(f"/api/training/{HONEST}/status")).json()
            agents[0].released.set()
            outcome = await honest_outcome(http)
            after = await processes(observer)
            trainings = {t["training_id"] for t in (await http.get("/api/trainings")).json()}
        expected = Counter(p.rejection for p in requests if p.rejection) + bus + \
            Counter({"ws:unauthorized": 1, "ws:too_many_sockets": 1})
        return Probed(outcome, (during["status"], during["round"], during["phase"]), [*wrong_http, *wrong_ws],
                      expected, await rejection_counts(observer), await rejection_events(observer), before, after,
                      trainings, {text(k) for k in await observer.hkeys(KEYS.agents)},
                      bool(await observer.hexists(KEYS.round_updates(OWN, 1), ATTACKER)),
                      {service: await observer.xlen(KEYS.dead_letters(service)) for service in SERVICES})
    finally:
        await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)
        await observer.aclose()


@pytest.mark.timeout(300)
async def test_every_bad_input_on_every_surface_is_refused_while_an_honest_training_runs_unchanged(
        tmp_path: Path) -> None:
    clean = await clean_run(tmp_path / "clean")
    with deployed(tmp_path / "probed") as deployment:
        probed = await probed_run(deployment)
        assert_no_process_died_or_restarted(deployment, probed.before, probed.after)

    assert probed.round_during_probe == ("running", HELD[1], "collecting"), probed.round_during_probe
    assert not probed.wrong, "\n".join(probed.wrong)
    assert probed.counted == probed.expected, (probed.counted - probed.expected, probed.expected - probed.counted)
    assert probed.reported == probed.expected, (probed.reported - probed.expected, probed.expected - probed.reported)
    growth_mb = {s: (probed.after.rss_kib[s] - probed.before.rss_kib[s]) / 1024 for s in probed.before.rss_kib}
    print(f"{sum(probed.expected.values())} inputs refused and counted; resident memory growth: {growth_mb} MB")
    assert all(growth < RSS_GROWTH_BOUND_MB for growth in growth_mb.values()), growth_mb

    assert [(v, r) for v, r, _digest in probed.outcome.versions] == [(v, v) for v in range(ROUNDS + 1)]
    assert probed.outcome.versions == clean.versions
    assert probed.outcome.accuracy == clean.accuracy
    assert probed.trainings == {HONEST, OWN}
    assert probed.agents == {f"agent-{i:03d}" for i in range(AGENTS)} | {ATTACKER, SILENT}
    assert probed.attacker_accepted, "the attacker's one honest update was not accepted"
    assert probed.dead_letters == dict.fromkeys(SERVICES, 0), probed.dead_letters
