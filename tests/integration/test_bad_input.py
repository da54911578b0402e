"""Bad input on every inbound path is rejected with a reason, counted, reported; the round goes on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis

from federated_learning.bus.blobs import RedisBlobStore
from federated_learning.coordination.state import TrainingState
from federated_learning.privacy.signing import AgentKeyPair
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import (
    AgentJoined,
    AgentLeft,
    Heartbeat,
    SignedByAgent,
    TaskKind,
    UpdateSubmitted,
    VersionRecord,
    encode,
)
from federated_learning.protocol.tensors import encode_layers
from tests.integration.conftest import digits_config, start_training, wait_for_status

KEYS = Keys()


async def keep_alive(redis: aioredis.Redis, agents: list[str]) -> None:
    while True:
        for agent in agents:
            beat = signed_by(Heartbeat(agent_id=agent), IDENTITIES[agent])
            await redis.xadd(KEYS.agent_stream, encode(beat))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)


def model(weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {"dense.weight": np.zeros((64, 10), np.float32) if weight is None else weight,
            "dense.bias": np.zeros(10, np.float32) if bias is None else bias}


IDENTITIES = {f"fake-{i}": AgentKeyPair.generate() for i in range(12)}
Signed = TypeVar("Signed", bound=SignedByAgent)


def signed_by(message: Signed, key: AgentKeyPair) -> Signed:
    return message.model_copy(update={"signature": key.sign(message.signed_bytes()).hex()})


async def submit(redis: aioredis.Redis, agent: str, digest: str, round_number: int = 1, *,
                 signer: AgentKeyPair | None = None, signed: bool = True,
                 training_id: str = "bad") -> dict[str, str]:
    """XADD an update notice; returns the entry's fields, so that a test can XADD them again."""
    notice = UpdateSubmitted(kind=TaskKind.TRAIN, training_id=training_id, round=round_number, attempt=1,
                             agent_id=agent, update_digest=digest, num_examples=10,
                             received_model_version=0)
    if signed:
        key = signer or IDENTITIES.get(agent) or AgentKeyPair.generate()
        notice = notice.model_copy(update={"signature": key.sign(notice.signed_bytes()).hex()})
    fields = encode(notice)
    await redis.xadd(KEYS.update_stream, fields)  # type: ignore[arg-type]
    return fields


async def join_fake_agents(redis: aioredis.Redis, agents: list[str]) -> None:
    for agent in agents:
        joined = signed_by(AgentJoined(agent_id=agent, datasets={"digits": 10},
                                       public_key=IDENTITIES[agent].public_key_bytes.hex()), IDENTITIES[agent])
        await redis.xadd(KEYS.agent_stream, encode(joined))  # type: ignore[arg-type]


async def wait_until_collecting(redis: aioredis.Redis, training_id: str) -> TrainingState:
    state = await wait_for_status(redis, training_id, {"running"})
    while state.phase != "collecting":
        state = await wait_for_status(redis, training_id, {"running"})
    return state


async def rejection_counts(redis: aioredis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (await redis.hgetall(KEYS.rejections)).items()}


async def test_every_bad_update_is_rejected_and_the_round_completes(redis: aioredis.Redis, system, settings) -> None:
    agents = [f"fake-{i}" for i in range(11)]
    await join_fake_agents(redis, agents)
    beats = asyncio.create_task(keep_alive(redis, agents))
    await system.start()
    try:
        await start_training(redis, "bad", digits_config(rounds=1, clients_per_round=11, min_clients=2,
                                                         round_deadline_s=3.0))
        state = await wait_until_collecting(redis, "bad")
        assert state.selected == sorted(agents)
        blobs = RedisBlobStore(redis, KEYS, max_bytes=settings.max_blob_bytes)
        nan = np.zeros((64, 10), np.float32)
        nan[3, 3] = np.nan
        await submit(redis, "fake-0", await blobs.put(encode_layers(model(weight=nan)), owner="fake-0"))
        await submit(redis, "fake-1", await blobs.put(encode_layers(model(weight=np.zeros((10, 64), np.float32))), owner="fake-1"))
        await submit(redis, "fake-2", await blobs.put(encode_layers(model(bias=np.zeros(10, np.float64))), owner="fake-2"))
        tampered = await blobs.put(encode_layers(model(bias=np.ones(10, np.float32))), owner="fake-3")
        await redis.set(KEYS.blob(tampered, "fake-3"), encode_layers(model(bias=np.full(10, 9, np.float32))))
        await submit(redis, "fake-3", tampered)
        oversized = "f" * 64
        await redis.set(KEYS.blob(oversized, "fake-4"), b"x" * (settings.max_blob_bytes + 1))
        await submit(redis, "fake-4", oversized)
        await submit(redis, "ghost", await blobs.put(encode_layers(model()), owner="ghost"))
        await submit(redis, "fake-5", await blobs.put(encode_layers(model()), owner="fake-5"), round_number=7)
        await redis.xadd(KEYS.update_stream, {"m": "{not json"})
        await submit(redis, "fake-8", await blobs.put(encode_layers(model()), owner="fake-8"), signer=AgentKeyPair.generate())
        await submit(redis, "fake-9", await blobs.put(encode_layers(model()), owner="fake-9"), signed=False)
        good = await submit(redis, "fake-6", await blobs.put(encode_layers(model(bias=np.full(10, 2, np.float32))), owner="fake-6"))
        await redis.xadd(KEYS.update_stream, good)  # type: ignore[arg-type]  # the same signed notice replayed
        await submit(redis, "fake-7", await blobs.put(encode_layers(model(bias=np.full(10, 3, np.float32))), owner="fake-7"))

        state = await wait_for_status(redis, "bad", {"completed", "failed"}, timeout_s=30)
    finally:
        beats.cancel()
    events = [json.loads(fields[b"m"]) for _id, fields in await redis.xrange(KEYS.event_stream)]
    assert state.status == "completed", "\n".join(f"{e['kind']} {e['message']}" for e in events if e["kind"] != "input_rejected")
    counts = await rejection_counts(redis)
    for reason in ("not_finite", "bad_shape", "bad_dtype", "hash_mismatch", "too_large",
                   "unknown_agent", "stale_round", "malformed", "bad_signature", "unsigned", "duplicate"):
        assert counts.get(f"updates:{reason}") == 1, (reason, counts)
    record = VersionRecord.model_validate_json(await redis.hget(KEYS.versions("bad"), "1"))
    assert record.contributors == ["fake-6", "fake-7"]
    events = [json.loads(fields[b"m"]) for _id, fields in await redis.xrange(KEYS.event_stream)]
    reasons = {e["data"].get("reason") for e in events if e["kind"] == "input_rejected"}
    assert {"not_finite", "bad_shape", "hash_mismatch", "stale_round", "unknown_agent", "duplicate"} <= reasons
    [duplicate] = [e for e in events if e["kind"] == "input_rejected" and e["data"]["reason"] == "duplicate"]
    assert (duplicate["agent_id"], duplicate["round"]) == ("fake-6", 1)


async def group_caught_up(redis: aioredis.Redis, stream: str, group: str, entry_id: bytes) -> None:
    """Wait until `group` has delivered up to `entry_id` and acknowledged everything."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        [info] = [g for g in await redis.xinfo_groups(stream) if g["name"] == group.encode()]
        if info["last-delivered-id"] == entry_id and info["pending"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"group {group} did not handle {entry_id!r}")


@contextlib.asynccontextmanager
async def one_round_of_fake_agents(redis: aioredis.Redis, system, training_id: str, agents: list[str],  # type: ignore[no-untyped-def]
                                   **config: Any) -> AsyncIterator[None]:
    """``agents`` joined and heartbeating, the services running, and a one-round training collecting."""
    await join_fake_agents(redis, agents)
    beats = asyncio.create_task(keep_alive(redis, agents))
    await system.start()
    try:
        await start_training(redis, training_id, digits_config(rounds=1, **config))
        await wait_until_collecting(redis, training_id)
        yield
    finally:
        beats.cancel()


async def assert_committed(redis: aioredis.Redis, training_id: str, contributors: list[str],
                           rejections: dict[str, int]) -> None:
    """The training completed, its version 1 from ``contributors``, with exactly these update rejections."""
    state = await wait_for_status(redis, training_id, {"completed", "failed"}, timeout_s=60)
    assert state.status == "completed", state.reason
    record = VersionRecord.model_validate_json(await redis.hget(KEYS.versions(training_id), "1"))
    assert record.contributors == contributors
    counts = await rejection_counts(redis)
    assert {k: v for k, v in counts.items() if k.startswith("updates:")} == rejections


async def test_a_redelivered_notice_is_silent_and_a_replayed_one_is_rejected(
        redis: aioredis.Redis, system, settings) -> None:
    agents = ["fake-0", "fake-1", "fake-2"]
    async with one_round_of_fake_agents(redis, system, "replay", agents, clients_per_round=3, min_clients=2,
                                        round_deadline_s=10.0):
        blobs = RedisBlobStore(redis, KEYS, max_bytes=settings.max_blob_bytes)
        first = await submit(redis, "fake-0", await blobs.put(encode_layers(model(bias=np.ones(10, np.float32))), owner="fake-0"),
                             training_id="replay")
        [(entry_id, _fields)] = await redis.xrange(KEYS.update_stream)
        await group_caught_up(redis, KEYS.update_stream, "coordinator", entry_id)
        assert await redis.hexists(KEYS.round_updates("replay", 1), "fake-0")

        await redis.xgroup_setid(KEYS.update_stream, "coordinator", "0")  # deliver that entry again
        await group_caught_up(redis, KEYS.update_stream, "coordinator", entry_id)
        assert "updates:duplicate" not in await rejection_counts(redis)

        replay_id = await redis.xadd(KEYS.update_stream, first)  # type: ignore[arg-type]
        await group_caught_up(redis, KEYS.update_stream, "coordinator", replay_id)
        assert (await rejection_counts(redis)).get("updates:duplicate") == 1

        for agent, bias in (("fake-1", 2.0), ("fake-2", 3.0)):
            await submit(redis, agent, await blobs.put(encode_layers(model(bias=np.full(10, bias, np.float32))), owner=agent),
                         training_id="replay")
        await assert_committed(redis, "replay", agents, {"updates:duplicate": 1})


async def test_malformed_entries_on_every_service_stream_are_rejected(redis: aioredis.Redis, system) -> None:
    await system.start()
    streams = {
        KEYS.control_stream: "control", KEYS.agent_stream: "agents", KEYS.version_stream: "versions",
        KEYS.job_stream: "jobs", KEYS.aggregate_stream: "aggregates", KEYS.release_stream: "releases",
        KEYS.event_stream: "events",
    }
    for stream in streams:
        await redis.xadd(stream, {"m": '{"schema_version": 99}'})
    for _ in range(100):
        counts = await rejection_counts(redis)
        if all(counts.get(f"{source}:malformed") for source in streams.values()):
            break
        await asyncio.sleep(0.05)
    assert all(counts.get(f"{source}:malformed") == 1 for source in streams.values()), counts
    for stream, group in ((KEYS.job_stream, "aggregator"), (KEYS.release_stream, "versions")):
        assert (await redis.xpending(stream, group))["pending"] == 0


async def test_forged_replayed_or_unsigned_agent_messages_are_rejected(redis: aioredis.Redis, system) -> None:
    victim, other = AgentKeyPair.generate(), AgentKeyPair.generate()
    key = victim.public_key_bytes.hex()
    await system.start("coordinator")
    joined = AgentJoined(agent_id="victim", datasets={"digits": 10}, public_key=key)
    await redis.xadd(KEYS.agent_stream, encode(signed_by(joined, victim)))  # type: ignore[arg-type]
    forged_join = AgentJoined(agent_id="victim", datasets={"digits": 99999}, public_key=key)
    messages = [
        signed_by(forged_join, other),                                       # someone else's key
        forged_join,                                                         # unsigned, with the victim's key
        signed_by(Heartbeat(agent_id="victim"), other),                      # forged heartbeat
        Heartbeat(agent_id="victim"),                                        # unsigned heartbeat
        signed_by(Heartbeat(agent_id="victim", sent_at=time.time() - 3600), victim),  # replayed heartbeat
        signed_by(AgentLeft(agent_id="victim", reason="forged"), other),     # forged leave
    ]
    for message in messages:
        await redis.xadd(KEYS.agent_stream, encode(message))  # type: ignore[arg-type]
    await redis.xadd(KEYS.agent_stream, encode(signed_by(Heartbeat(agent_id="victim"), victim)))  # type: ignore[arg-type]

    deadline = time.monotonic() + 10
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = await rejection_counts(redis)
        if sum(v for k, v in counts.items() if k.startswith("agents:")) >= len(messages):
            break
        await asyncio.sleep(0.05)
    assert counts.get("agents:bad_signature") == 3
    assert counts.get("agents:unsigned") == 2
    assert counts.get("agents:stale_message") == 1
    record = json.loads(await redis.hget(KEYS.agents, "victim"))
    assert record["datasets"] == {"digits": 10}
    assert await redis.zscore(KEYS.agents_last_seen, "victim") is not None  # the forged leave did nothing


async def test_an_entry_id_from_the_future_does_not_make_honest_heartbeats_stale(redis: aioredis.Redis,
                                                                               system) -> None:
    honest = AgentKeyPair.generate()
    await system.start("coordinator")
    joined = AgentJoined(agent_id="honest", datasets={"digits": 10}, public_key=honest.public_key_bytes.hex())
    await redis.xadd(KEYS.agent_stream, encode(signed_by(joined, honest)))  # type: ignore[arg-type]
    future_ms = int((time.time() + 86_400) * 1000)
    await redis.xadd(KEYS.agent_stream, {b"m": b"{}"}, id=f"{future_ms}-0")  # every later id is in the future
    await redis.xadd(KEYS.agent_stream, encode(signed_by(Heartbeat(agent_id="honest"), honest)))  # type: ignore[arg-type]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (await rejection_counts(redis)).get("agents:malformed", 0) < 1:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert "agents:stale_message" not in await rejection_counts(redis)
    assert (await redis.zscore(KEYS.agents_last_seen, "honest") or 0) <= time.time()


async def test_agent_messages_with_out_of_range_fields_are_malformed_not_handled(redis: aioredis.Redis,
                                                                                system) -> None:
    """A NaN send time, oversized device facts, absurd example counts: refused at the boundary with
    the field named, never raised inside a handler (which would retry and dead-letter them)."""
    await system.start("coordinator")
    key = AgentKeyPair.generate()
    beat = Heartbeat(agent_id="nan").model_dump(mode="json")
    join = AgentJoined(agent_id="junk", datasets={"digits": 10}, public_key=key.public_key_bytes.hex()
                       ).model_dump(mode="json")
    bodies = [
        {**beat, "sent_at": float("nan")},
        {**beat, "sent_at": float("inf")},
        {**join, "device": {f"k{i}": "x" for i in range(33)}},
        {**join, "device": {"os": "x" * 257}},
        {**join, "datasets": {"digits": 2**70}},
        {**join, "datasets": {f"d{i}": 1 for i in range(65)}},
    ]
    for body in bodies:
        await redis.xadd(KEYS.agent_stream, {"m": json.dumps(body, allow_nan=True)})
    deadline = time.monotonic() + 10
    counts: dict[str, int] = {}
    while time.monotonic() < deadline and counts.get("agents:malformed", 0) < len(bodies):
        counts = await rejection_counts(redis)
        await asyncio.sleep(0.05)
    assert counts.get("agents:malformed") == len(bodies), counts
    assert await redis.hget(KEYS.agents, "junk") is None
    assert await redis.xlen(KEYS.dead_letters("coordinator")) == 0


async def test_an_update_that_weighs_more_than_the_training_allows_is_refused(redis: aioredis.Redis, system,
                                                                             settings) -> None:
    await system.start()
    agents = [f"fake-{i}" for i in range(3)]
    await join_fake_agents(redis, agents)
    beating = asyncio.create_task(keep_alive(redis, agents))
    try:
        await start_training(redis, "heavy", digits_config(rounds=1, clients_per_round=3, min_clients=3,
                                                           max_examples_per_update=1000))
        await wait_until_collecting(redis, "heavy")
        blobs = RedisBlobStore(redis, KEYS, max_bytes=settings.max_blob_bytes)
        digest = await blobs.put(encode_layers(model()), owner="fake-0")
        notice = UpdateSubmitted(kind=TaskKind.TRAIN, training_id="heavy", round=1, attempt=1, agent_id="fake-0",
                                 update_digest=digest, num_examples=10**9, received_model_version=0)
        await redis.xadd(KEYS.update_stream, encode(signed_by(notice, IDENTITIES["fake-0"])))  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        counts: dict[str, int] = {}
        while time.monotonic() < deadline and not counts.get("updates:too_many_examples"):
            counts = await rejection_counts(redis)
            await asyncio.sleep(0.05)
        assert counts.get("updates:too_many_examples") == 1, counts
        assert not await redis.hexists(KEYS.round_updates("heavy", 1), "fake-0")
    finally:
        beating.cancel()


async def test_a_retry_after_an_outage_asks_the_live_agents_again(redis: aioredis.Redis, system) -> None:
    """Every live agent was asked and none answered by the deadline (they were away): the retry
    asks them again instead of asking nobody and failing the training."""
    agents = [f"fake-{i}" for i in range(3)]
    await join_fake_agents(redis, agents)
    beating = asyncio.create_task(keep_alive(redis, agents))
    try:
        await system.start()
        await start_training(redis, "outage", digits_config(rounds=1, clients_per_round=3, min_clients=3,
                                                            round_deadline_s=1.0, max_round_attempts=3))
        deadline = time.monotonic() + 20
        attempts: set[int] = set()
        while time.monotonic() < deadline and 2 not in attempts:
            entries = await redis.xrange(KEYS.inbox_stream("fake-0"))
            attempts = {json.loads(fields[b"m"])["attempt"] for _id, fields in entries}
            await asyncio.sleep(0.05)
        assert 2 in attempts, attempts
    finally:
        beating.cancel()


async def test_a_silent_volunteer_is_waited_for_once_not_every_round(redis: aioredis.Redis, system,
                                                                    make_agents) -> None:
    """A plain-HTTP client that stays alive but sends nothing holds one round to its deadline;
    the next rounds close when the asked agents have answered."""
    volunteer = AgentKeyPair.generate()
    joined = AgentJoined(agent_id="http-silent", datasets={"digits": 10}, volunteer=True,
                         public_key=volunteer.public_key_bytes.hex())
    await redis.xadd(KEYS.agent_stream, encode(signed_by(joined, volunteer)))  # type: ignore[arg-type]

    async def beat() -> None:
        while True:
            message = signed_by(Heartbeat(agent_id="http-silent"), volunteer)
            await redis.xadd(KEYS.agent_stream, encode(message))  # type: ignore[arg-type]
            await asyncio.sleep(0.2)

    beating = asyncio.create_task(beat())
    try:
        await system.start()
        await make_agents(3)
        deadline_s = 5.0
        await start_training(redis, "silent", digits_config(rounds=3, clients_per_round=3, min_clients=3,
                                                           round_deadline_s=deadline_s))
        state = await wait_for_status(redis, "silent", {"completed", "failed"}, timeout_s=90)
        assert state.status == "completed", state.reason
        assert state.silent_volunteers == ["http-silent"]
        metrics = [json.loads(m) for m in await redis.lrange(KEYS.training_metrics("silent"), 0, -1)]
        assert len(metrics) == 3
        assert all(m["round_seconds"] < deadline_s for m in metrics[1:]), [m["round_seconds"] for m in metrics]
    finally:
        beating.cancel()


async def test_an_update_refused_for_its_values_is_withdrawn_and_the_agent_may_send_another(
        redis: aioredis.Redis, system, settings) -> None:
    """The coordinator checks an upload's header; the aggregator reads it whole as it is accepted,
    and the coordinator withdraws a refused one while the round collects."""
    agents = ["fake-0", "fake-1"]
    # The fake agents do not answer the final evaluation round: its deadline ends it.
    async with one_round_of_fake_agents(redis, system, "values", agents, clients_per_round=2, min_clients=2,
                                        round_deadline_s=8.0):
        blobs = RedisBlobStore(redis, KEYS, max_bytes=settings.max_blob_bytes)
        nan = np.zeros((64, 10), np.float32)
        nan[0, 0] = np.inf
        await submit(redis, "fake-0", await blobs.put(encode_layers(model(weight=nan)), owner="fake-0"),
                     training_id="values")
        deadline = time.monotonic() + 20
        while (await rejection_counts(redis)).get("updates:not_finite") != 1:
            assert time.monotonic() < deadline, await rejection_counts(redis)
            await asyncio.sleep(0.05)
        assert not await redis.hexists(KEYS.round_updates("values", 1), "fake-0"), "withdrawn"
        for agent, bias in (("fake-0", 1.0), ("fake-1", 3.0)):
            await submit(redis, agent, await blobs.put(encode_layers(model(bias=np.full(10, bias, np.float32))),
                                                       owner=agent), training_id="values")
        await assert_committed(redis, "values", agents, {"updates:not_finite": 1})
