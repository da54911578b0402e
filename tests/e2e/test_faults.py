"""Faults: kill -9 of every process mid-round under central DP, and a restart of the whole deployment.

One training at privacy level 'low' runs while the test kills, one after another and each at a
moment picked by a condition on the bus: an agent process holding its task; the coordinator
and the dashboard once a round has its first accepted update; the aggregator worker holding the
round's job, the privacy manager holding the aggregate it must release, the version manager
holding the release it must commit, the monitor holding a round's completion event; and the
coordinator again just after it wrote a round's job. A consumer is killed holding its entry
unhandled: frozen (SIGSTOP), the entry is delivered to it, then SIGKILL. The launcher's
supervisor restarts each service; the test restarts the agent, whose key is kept on disk. On a
slow machine the stalled round passes its deadline and its job is sent again: a second
aggregate of the same round, which must not be charged again either.

Afterwards the training has completed, versions 0..N are committed one per round and each
hashes (SHA-256, on disk, on the bus and over REST) to its recorded digest; every version was
aggregated from exactly the updates accepted for its round, each accepted from one entry; the
privacy ledger holds exactly N releases, as much epsilon as the accountant gives N releases
directly, and each version records the epsilon of its round; the monitor counted each round
once. A replayed aggregate is not charged again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis.asyncio as aioredis

from agents.client import FederatedClient
from federated_learning.bus.blob_stores import agent_blob_store
from federated_learning.bus.blobs import BlobMissing
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.monitoring.metrics import MetricType, TrainingMetric
from federated_learning.privacy.accountant import (
    GaussianEvent,
    PrivacyAccountant,
    compute_noise_multiplier,
)
from federated_learning.privacy.levels import privacy_targets
from federated_learning.protocol.keys import (
    GROUP_AGGREGATOR,
    GROUP_MONITOR,
    GROUP_PRIVACY,
    GROUP_VERSIONS,
    Keys,
)
from federated_learning.protocol.messages import ModelReleased, VersionRecord
from federated_learning.records.trainings import TrainingStore
from federated_learning.services.rounds import ACCEPTED_NOTICE_MARKERS
from tests.e2e.conftest import ROOT, Deployment, training_body, wait_status

pytestmark = pytest.mark.e2e

ROUNDS = 8
"""The kills land in the first three or four rounds; the rest show that the training goes on."""
PRIVACY_LEVEL = "low"
PROCESS_AGENTS = {"agent-p00": 10, "agent-p01": 11}
"""Agents in processes of their own (id -> shard of ``tests.e2e.fault_agent``)."""
STAGE_TIMEOUT_S = 60.0
POLL_S = 0.01

T = TypeVar("T")


@dataclass(frozen=True)
class Bus:
    """The deployment's Redis as the test reads it, and the training under test."""

    redis: aioredis.Redis
    keys: Keys
    training_id: str


class AgentProcess:
    """``tests.e2e.fault_agent`` as a child process, killed and started again by the test."""

    def __init__(self, agent_id: str, shard: int, redis_url: str, folder: Path) -> None:
        self.agent_id = agent_id
        self.command = [sys.executable, "-m", "tests.e2e.fault_agent", agent_id, str(shard),
                        "--redis-url", redis_url, "--state-dir", str(folder / "agent-keys")]
        self.log_path = folder / f"{agent_id}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def agent_processes(deployment: Deployment, tmp_path: Path) -> Iterator[dict[str, AgentProcess]]:
    fleet = {agent_id: AgentProcess(agent_id, shard, deployment.redis_url, tmp_path)
             for agent_id, shard in PROCESS_AGENTS.items()}
    for agent in fleet.values():
        agent.start()
    yield fleet
    for agent in fleet.values():
        agent.stop()


async def wait_until(check: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = STAGE_TIMEOUT_S) -> T:
    """Poll ``check`` until it returns something other than None; fail after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = await check()
        if result is not None:
            return result
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"{what}: not within {timeout_s:.0f}s")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def training_state(bus: Bus) -> TrainingState:
    state = await TrainingStore(bus.redis, bus.keys).load(bus.training_id)
    assert state is not None, f"no training {bus.training_id}"
    return state


async def service_pid(bus: Bus, service: str) -> int | None:
    """The pid in the service's health record (instance 0), None while it has none."""
    raw = await bus.redis.get(bus.keys.service_health(service, "0"))
    return None if raw is None else int(json.loads(raw)["pid"])


async def wait_restarted(bus: Bus, service: str, victim: int) -> None:
    async def replaced() -> int | None:
        pid = await service_pid(bus, service)
        return pid if pid not in (None, victim) else None

    await wait_until(replaced, f"{service} restarted after pid {victim} was killed")


async def last_entry_id(redis: aioredis.Redis, stream: str) -> bytes:
    entries = await redis.xrevrange(stream, count=1)
    return bytes(entries[0][0]) if entries else b"0-0"


async def next_entry(bus: Bus, stream: str, after: bytes,
                     wanted: Callable[[dict[str, Any]], bool]) -> tuple[bytes, dict[str, Any]]:
    """The first entry of the training on ``stream`` after ``after`` that ``wanted`` picks: id and message."""
    async def find() -> tuple[bytes, dict[str, Any]] | None:
        for entry_id, fields in await bus.redis.xrange(stream, min=f"({after.decode()}"):
            message: dict[str, Any] = json.loads(fields[b"m"])
            if message.get("training_id") == bus.training_id and wanted(message):
                return bytes(entry_id), message
        return None

    return await wait_until(find, f"an entry on {stream} after {after.decode()}")


@dataclass(frozen=True)
class Kill:
    """A service process killed in a round; the supervisor is to start another."""

    service: str
    pid: int
    round: int


async def live_pid(bus: Bus, service: str) -> int:
    pid = await service_pid(bus, service)
    assert pid is not None, f"{service} has no health record"
    return pid


async def kill_holding_next(bus: Bus, service: str, stream: str, group: str,
                            wanted: Callable[[dict[str, Any]], bool] = lambda _m: True) -> Kill:
    """Freeze ``service``, deliver it the next entry of ``stream`` that ``wanted`` picks, and kill
    it holding that entry unhandled."""
    victim = await live_pid(bus, service)
    consumer = f"{service}-0"
    os.kill(victim, signal.SIGSTOP)
    try:
        entry_id, message = await next_entry(bus, stream, await last_entry_id(bus.redis, stream), wanted)
        # What the server does for a consumer blocked in XREADGROUP when an entry arrives; the
        # frozen one may have been between two reads, or its read may have timed out.
        await bus.redis.xreadgroup(group, consumer, {stream: ">"}, count=10_000)
        [pending] = await bus.redis.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        assert pending["consumer"].decode() == consumer, pending
    finally:
        os.kill(victim, signal.SIGKILL)
    return Kill(service, victim, int(message["round"]))


async def kill_with_updates_in(bus: Bus, services: tuple[str, ...]) -> list[Kill]:
    """Kill ``services`` once the round being collected has an accepted update."""
    async def collecting_round() -> int | None:
        state = await training_state(bus)
        if state.phase is not RoundPhase.COLLECTING:
            return None
        accepted = await bus.redis.hlen(bus.keys.round_updates(bus.training_id, state.round))
        return state.round if accepted else None

    victims = {service: await live_pid(bus, service) for service in services}
    round_number = await wait_until(collecting_round, f"a round with an accepted update, to kill {services} in")
    for victim in victims.values():
        os.kill(victim, signal.SIGKILL)
    return [Kill(service, victim, round_number) for service, victim in victims.items()]


async def kill_after_the_next_job(bus: Bus) -> Kill:
    """Kill the coordinator right after it wrote a round's aggregation job."""
    victim = await live_pid(bus, "coordinator")
    _, job = await next_entry(bus, bus.keys.job_stream, await last_entry_id(bus.redis, bus.keys.job_stream),
                              lambda _m: True)
    os.kill(victim, signal.SIGKILL)
    return Kill("coordinator", victim, int(job["round"]))


async def kill_agent_holding_its_task(bus: Bus, agent: AgentProcess) -> int:
    """Kill the agent once its first training task is in its inbox, then start it again; return the round."""
    _, task = await next_entry(bus, bus.keys.inbox_stream(agent.agent_id), b"0-0", lambda m: m["kind"] == "train")
    agent.kill()
    agent.start()
    return int(task["round"])


async def wait_dashboard_answers(http: httpx.AsyncClient) -> None:
    async def answers() -> bool | None:
        try:
            return True if (await http.get("/api/system/health")).status_code == 200 else None
        except httpx.HTTPError:
            return None

    await wait_until(answers, "the restarted dashboard answers")


async def kill_every_process(bus: Bus, agent: AgentProcess, http: httpx.AsyncClient) -> dict[str, int]:
    """Each process killed once at its moment (the coordinator twice); the round each died in.

    Rounds take well under a second once the pipeline flows, so the kills follow each other
    without waiting for restarts: a frozen or dead service holds the pipeline until its
    successor runs, and every restart is checked at the end.
    """
    agent_round = await kill_agent_holding_its_task(bus, agent)
    coordinator, dashboard = await kill_with_updates_in(bus, ("coordinator", "dashboard"))
    await wait_restarted(bus, "coordinator", coordinator.pid)
    kills = {"coordinator": coordinator, "dashboard": dashboard,
             "aggregator": await kill_holding_next(bus, "aggregator", bus.keys.job_stream, GROUP_AGGREGATOR),
             "privacy": await kill_holding_next(bus, "privacy", bus.keys.aggregate_stream, GROUP_PRIVACY),
             "versions": await kill_holding_next(bus, "versions", bus.keys.release_stream, GROUP_VERSIONS),
             "monitor": await kill_holding_next(bus, "monitor", bus.keys.event_stream, GROUP_MONITOR,
                                                lambda m: m["kind"] == "round_completed"),
             "coordinator after a job": await kill_after_the_next_job(bus)}
    for kill in kills.values():
        await wait_restarted(bus, kill.service, kill.pid)
    await wait_dashboard_answers(http)
    return {"agent": agent_round, **{label: kill.round for label, kill in kills.items()}}


async def final_state(bus: Bus, timeout_s: float = 180.0) -> TrainingState:
    async def finished() -> TrainingState | None:
        state = await training_state(bus)
        return state if state.status.is_final else None

    return await wait_until(finished, f"training {bus.training_id} finished", timeout_s)


async def committed_versions(bus: Bus) -> list[VersionRecord]:
    """The training's version records, checked to be 0..ROUNDS with one version per round."""
    raw = await bus.redis.hgetall(bus.keys.versions(bus.training_id))
    records = sorted((VersionRecord.model_validate_json(v) for v in raw.values()), key=lambda r: r.version)
    assert [r.version for r in records] == list(range(ROUNDS + 1))
    assert [r.round for r in records] == list(range(ROUNDS + 1))
    by_round = await bus.redis.hgetall(bus.keys.version_by_round(bus.training_id))
    assert {int(r): int(v) for r, v in by_round.items()} == {r: r for r in range(ROUNDS + 1)}
    return records


async def assert_each_version_hashes_to_its_digest(bus: Bus, http: httpx.AsyncClient,
                                                   records: list[VersionRecord]) -> None:
    store, published = await agent_blob_store(bus.redis, bus.keys, max_bytes=1 << 30)
    assert published
    for record in records:
        checkpoint = Path(record.checkpoint)
        assert sha256(checkpoint.read_bytes()) == record.model_digest, f"checkpoint of version {record.version}"
        assert VersionRecord.model_validate_json(checkpoint.with_suffix(".json").read_text()) == record
        served = await http.get(f"/api/training/{bus.training_id}/versions/{record.version}/model")
        assert served.status_code == 200, served.text
        assert sha256(served.content) == record.model_digest, f"served model of version {record.version}"
        try:  # through the store the deployment published: Redis, or a folder (decision 0014)
            blob: bytes | None = await store.get(record.model_digest)
        except BlobMissing:
            blob = None  # pruned: served from its checkpoint
        assert blob is None or sha256(blob) == record.model_digest, f"stored blob of version {record.version}"


async def accepted_notice_entries(bus: Bus) -> Counter[tuple[int, str]]:
    """How many update-stream entries the coordinator accepted per (round, agent), from its markers."""
    accepted: Counter[tuple[int, str]] = Counter()
    async for key in bus.redis.scan_iter(match=bus.keys.applied(ACCEPTED_NOTICE_MARKERS, "*"), count=1000):
        value = await bus.redis.get(key)
        if value is None:
            continue
        training_id, round_number, agent_id = value.decode().rsplit("/", 2)
        if training_id == bus.training_id:
            accepted[(int(round_number), agent_id)] += 1
    return accepted


async def assert_each_update_counted_once(bus: Bus, records: list[VersionRecord]) -> Counter[tuple[int, str]]:
    accepted = await accepted_notice_entries(bus)
    assert max(accepted.values()) == 1, [k for k, n in accepted.items() if n > 1]
    for record in records[1:]:
        assert len(set(record.contributors)) == len(record.contributors), record.contributors
        in_round = sorted(k.decode() for k in await bus.redis.hkeys(bus.keys.round_updates(bus.training_id,
                                                                                           record.round)))
        assert record.contributors == in_round, f"round {record.round}"
        assert {(record.round, agent) for agent in record.contributors} <= accepted.keys()
    return accepted


async def assert_budget_charged_once_per_round(bus: Bus, records: list[VersionRecord]) -> None:
    target = privacy_targets(PRIVACY_LEVEL)
    noise_multiplier = compute_noise_multiplier(target.epsilon, target.delta, 1.0, ROUNDS)
    direct = PrivacyAccountant(target.epsilon, target.delta)
    expected = [0.0] + [direct.step(noise_multiplier, 1.0) for _ in range(ROUNDS)]
    ledger = PrivacyAccountant.from_dict(json.loads(await bus.redis.get(bus.keys.privacy_budget(bus.training_id))))
    assert [e.to_dict() for e in ledger.events] == [GaussianEvent(noise_multiplier, 1.0, ROUNDS).to_dict()]
    assert ledger.get_epsilon() == pytest.approx(expected[ROUNDS], rel=1e-9)
    assert (await training_state(bus)).epsilon_spent == pytest.approx(expected[ROUNDS], rel=1e-9)
    releases = {int(r): ModelReleased.model_validate_json(v)
                for r, v in (await bus.redis.hgetall(bus.keys.release(bus.training_id))).items()}
    assert sorted(releases) == list(range(1, ROUNDS + 1))
    for record in records[1:]:
        release = releases[record.round]
        assert (record.model_digest, record.privacy) == (release.model_digest, release.privacy)
        assert record.privacy.mechanism == "gaussian" and record.privacy.noise_std > 0
        assert record.privacy.epsilon_spent == pytest.approx(expected[record.round], rel=1e-9), record.version


async def monitored_rounds(bus: Bus) -> Counter[int]:
    """How many times the monitor recorded each round's completion (its round-time series)."""
    raw = await bus.redis.lrange(bus.keys.metric_series(bus.training_id), 0, -1)
    metrics = [TrainingMetric.model_validate_json(m) for m in raw]
    return Counter(m.round_number for m in metrics if m.metric_type is MetricType.ROUND_TIME)


async def assert_a_replayed_aggregate_is_not_charged_again(bus: Bus) -> None:
    """A copy of the last round's aggregate (a redelivery after the release) is re-announced,
    neither charged nor committed again."""
    budget = await bus.redis.get(bus.keys.privacy_budget(bus.training_id))
    versions = await bus.redis.hgetall(bus.keys.versions(bus.training_id))
    aggregates = []
    for _id, fields in await bus.redis.xrange(bus.keys.aggregate_stream):
        message = json.loads(fields[b"m"])
        if (message["training_id"], message["round"]) == (bus.training_id, ROUNDS):
            aggregates.append(fields)
    assert aggregates, f"round {ROUNDS}'s aggregate is not on {bus.keys.aggregate_stream}"
    announced = await last_entry_id(bus.redis, bus.keys.version_stream)
    await bus.redis.xadd(bus.keys.aggregate_stream, aggregates[-1])
    await next_entry(bus, bus.keys.version_stream, announced, lambda m: m["round"] == ROUNDS)
    assert await bus.redis.get(bus.keys.privacy_budget(bus.training_id)) == budget
    assert await bus.redis.hgetall(bus.keys.versions(bus.training_id)) == versions


async def assert_each_round_committed_and_charged_once(bus: Bus, http: httpx.AsyncClient
                                                       ) -> Counter[tuple[int, str]]:
    """Versions 0..ROUNDS, one per round, each hashing to its digest, made of its round's updates
    each accepted once, and charged once; returns the accepted entries per (round, agent)."""
    records = await committed_versions(bus)
    await assert_each_version_hashes_to_its_digest(bus, http, records)
    accepted = await assert_each_update_counted_once(bus, records)
    await assert_budget_charged_once_per_round(bus, records)
    return accepted


async def start_training(bus_redis: aioredis.Redis, http: httpx.AsyncClient, **overrides: Any) -> Bus:
    started = await http.post("/api/training/start",
                              json=training_body(ROUNDS, privacy_level=PRIVACY_LEVEL, **overrides))
    assert started.status_code == 202, started.text
    return Bus(bus_redis, Keys(), started.json()["training_id"])


async def kill_every_process_reporting(bus: Bus, agent: AgentProcess, http: httpx.AsyncClient,
                                       deployment: Deployment) -> dict[str, int]:
    """:func:`kill_every_process`, failing with the training's state and the services' logs."""
    try:
        return await kill_every_process(bus, agent, http)
    except AssertionError as exc:
        state = await training_state(bus)
        raise AssertionError(f"{exc}\ntraining: {state.status.value} round {state.round} ({state.phase.value}) "
                             f"{state.reason}\n{deployment.log_tail()}") from exc


@pytest.mark.timeout(300)
@pytest.mark.parametrize("deployment", ["redis", "folder"], indirect=True)
async def test_every_process_killed_mid_round_leaves_each_round_committed_and_charged_once(
        deployment: Deployment, agents: list[FederatedClient], agent_processes: dict[str, AgentProcess]) -> None:
    redis = aioredis.Redis.from_url(deployment.redis_url)
    agent = agent_processes["agent-p00"]
    try:
        async def joined() -> bool | None:
            seen = [await redis.zscore(Keys().agents_last_seen, agent_id) for agent_id in PROCESS_AGENTS]
            return True if None not in seen else None

        await wait_until(joined, "the agent processes joined")
        async with deployment.client() as http:
            # Every live agent is asked every round, the agent processes too.
            bus = await start_training(redis, http, over_selection=3.0)

            killed = await kill_every_process_reporting(bus, agent, http, deployment)
            state = await final_state(bus)

            assert state.status.value == "completed", (state.reason, killed)
            assert max(killed.values()) <= ROUNDS, killed
            accepted = await assert_each_round_committed_and_charged_once(bus, http)
        assert any(r > killed["agent"] and a == agent.agent_id for r, a in accepted), \
            f"no update of the restarted {agent.agent_id} was accepted after round {killed['agent']}"
        counted = await monitored_rounds(bus)
        # A coordinator killed between committing a round and announcing it leaves that round
        # without its completion event; no round is ever counted twice.
        assert counted[killed["monitor"]] == 1
        assert {r for r in range(1, ROUNDS + 1) if counted[r] != 1} <= {killed["coordinator after a job"]}, counted
        assert set(counted) <= set(range(1, ROUNDS + 1)) and max(counted.values()) == 1, counted
        await assert_a_replayed_aggregate_is_not_charged_again(bus)
    finally:
        await redis.aclose()


async def test_restarted_deployment_resumes_the_training(deployment: Deployment,
                                                         agents: list[FederatedClient]) -> None:
    redis = aioredis.Redis.from_url(deployment.redis_url)
    try:
        async with deployment.client() as http:
            bus = await start_training(redis, http)
            before = await wait_status(http, bus.training_id, {"running"}, min_round=3)
    finally:
        await redis.aclose()
    deployment.stop()
    deployment.start()
    redis = aioredis.Redis.from_url(deployment.redis_url)
    bus = Bus(redis, bus.keys, bus.training_id)
    try:
        async with deployment.client() as http:
            resumed = (await http.get(f"/api/training/{bus.training_id}/status")).json()
            assert resumed["current_version"] >= before["current_version"]
            status = await wait_status(http, bus.training_id, {"completed", "failed"}, timeout_s=180)
            assert status["status"] == "completed", status["reason"]
            await assert_each_round_committed_and_charged_once(bus, http)
        assert max((await monitored_rounds(bus)).values()) == 1
    finally:
        await redis.aclose()
