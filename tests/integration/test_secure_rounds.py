"""Secure-aggregation rounds through the bus, against a real valkey-server.

The agents' deltas are recorded in the test (they never leave the agents in the clear);
the committed model must equal the base plus their example-weighted mean, to within the
fixed-point rounding, also when an agent drops out after sending its shares.
"""

from __future__ import annotations

import asyncio

import numpy as np
import redis.asyncio as aioredis

from agents.client import FederatedClient
from federated_learning.bus.blobs import RedisBlobStore
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import (
    AggregationJob,
    SecureAggregationSpec,
    UpdateSubmitted,
    VersionRecord,
)
from federated_learning.protocol.secure_messages import MASKED_LAYER, decode_secure_inbox_message
from federated_learning.protocol.tensors import decode_layers
from tests.integration.conftest import digits_config, start_training, wait_for_status

MAX_BLOB = 1 << 22


def record_deltas(agents: list[FederatedClient]) -> dict[tuple[str, int], tuple[np.ndarray, int]]:
    """(agent, round) -> (flattened delta, examples) of every update an agent holds for masking."""
    recorded: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
    for agent in agents:
        original = agent.secure.hold

        async def hold(task, evaluation, trained, delta, *, _agent=agent, _original=original) -> None:  # type: ignore[no-untyped-def]
            recorded[(_agent.agent_id, task.round)] = (np.array(delta, dtype=np.float64), trained.num_examples)
            await _original(task, evaluation, trained, delta)

        agent.secure.hold = hold  # type: ignore[method-assign]
    return recorded


async def jobs_of(redis: aioredis.Redis, training_id: str) -> list[AggregationJob]:
    entries = await redis.xrange(Keys().job_stream)
    jobs = [AggregationJob.model_validate_json(fields[b"m"]) for _id, fields in entries]
    return [job for job in jobs if job.training_id == training_id]


async def model_of(redis: aioredis.Redis, training_id: str, version: int) -> np.ndarray:
    keys = Keys()
    record = VersionRecord.model_validate_json(await redis.hget(keys.versions(training_id), str(version)))
    layers = decode_layers(await redis.get(keys.blob(record.model_digest)), max_bytes=MAX_BLOB)
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in layers.values()])


def expected_model(base: np.ndarray, recorded: dict[tuple[str, int], tuple[np.ndarray, int]],
                   round_number: int, contributors: list[str]) -> np.ndarray:
    deltas = [recorded[(agent, round_number)] for agent in contributors]
    total = sum(n for _d, n in deltas)
    return base + sum(d * n for d, n in deltas) / total


async def test_secure_rounds_commit_the_weighted_mean_without_plain_updates(
        redis: aioredis.Redis, system, make_agents, monkeypatch) -> None:
    async def keep(_store: RedisBlobStore, _blobs: list[tuple[str, str | None]]) -> None:
        """Committed rounds' uploads stay for the check below of what travelled."""

    monkeypatch.setattr(RedisBlobStore, "discard", keep)
    await system.start()
    agents = await make_agents(5)
    recorded = record_deltas(agents)
    await start_training(redis, "sec", digits_config(rounds=2, clients_per_round=5, min_clients=3,
                                                     secure_aggregation=True))

    state = await wait_for_status(redis, "sec", {"completed", "failed"}, timeout_s=90)

    assert state.status == "completed", state.reason
    jobs = await jobs_of(redis, "sec")
    assert [job.round for job in jobs] == [1, 2]
    for job in jobs:
        assert isinstance(job.secure, SecureAggregationSpec)
        assert len(job.secure.responders) >= job.secure.session.threshold
        for ref in job.updates:  # what travelled is masked: one uint32 vector, not the update
            blob = decode_layers(await redis.get(Keys().blob(ref.digest, ref.agent_id)), max_bytes=MAX_BLOB,
                                 allowed_dtypes=frozenset({"uint32"}))
            assert list(blob) == [MASKED_LAYER]
        base = await model_of(redis, "sec", job.base_version)
        committed = await model_of(redis, "sec", job.base_version + 1)
        expected = expected_model(base, recorded, job.round, [ref.agent_id for ref in job.updates])
        # fixed point: each agent adds at most 0.5 / scale per coordinate
        assert np.max(np.abs(committed - expected)) <= len(job.updates) / job.secure.session.scale + 1e-6
        assert np.max(np.abs(committed - base)) > 1e-3


async def test_a_dropout_after_sharing_keys_is_unmasked_from_the_survivors_shares(
        redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    agents = await make_agents(5)
    recorded = record_deltas(agents)
    quitter = agents[0]

    async def vanish(_held, _delivery) -> None:  # type: ignore[no-untyped-def]
        quitter._stop.set()  # stops heartbeating and reading its inbox: gone after its shares

    quitter.secure._upload_masked = vanish  # type: ignore[method-assign]
    await start_training(redis, "drop", digits_config(rounds=1, clients_per_round=5, min_clients=3,
                                                      secure_aggregation=True, round_deadline_s=8))

    state = await wait_for_status(redis, "drop", {"completed", "failed"}, timeout_s=90)

    assert state.status == "completed", state.reason
    job = (await jobs_of(redis, "drop"))[0]
    assert job.secure is not None
    assert quitter.agent_id in job.secure.share_senders
    assert quitter.agent_id not in [ref.agent_id for ref in job.updates]
    base = await model_of(redis, "drop", 0)
    committed = await model_of(redis, "drop", 1)
    expected = expected_model(base, recorded, 1, [ref.agent_id for ref in job.updates])
    assert np.max(np.abs(committed - expected)) <= len(job.updates) / job.secure.session.scale + 1e-6


async def test_secure_messages_from_outside_the_session_are_rejected_and_counted(
        redis: aioredis.Redis, system, make_agents) -> None:
    from federated_learning.protocol.messages import encode
    from federated_learning.protocol.secure_messages import SecureUnmaskShares

    await system.start()
    await make_agents(4)
    await start_training(redis, "rej", digits_config(rounds=1, clients_per_round=4, min_clients=3,
                                                     secure_aggregation=True))
    forged = SecureUnmaskShares(training_id="rej", round=1, attempt=1, agent_id="nobody")
    await redis.xadd(Keys().update_stream, encode(forged))  # type: ignore[arg-type]
    await redis.xadd(Keys().update_stream, {b"m": b'{"type": "secure_shares", "schema_version": 1}'})

    state = await wait_for_status(redis, "rej", {"completed", "failed"}, timeout_s=90)

    assert state.status == "completed", state.reason
    rejections = {k.decode(): int(v) for k, v in (await redis.hgetall(Keys().rejections)).items()}
    assert rejections.get("updates:unknown_agent", 0) >= 1
    assert rejections.get("updates:malformed", 0) >= 1


async def test_a_plain_update_in_a_secure_round_is_refused_and_the_round_goes_on(
        redis: aioredis.Redis, system, make_agents) -> None:
    from federated_learning.protocol.messages import encode
    from federated_learning.protocol.tensors import encode_layers

    await system.start()
    agents = await make_agents(4)
    cheater = agents[0]

    async def upload_plain(held, _delivery) -> None:  # type: ignore[no-untyped-def]
        blob = encode_layers({"masked": held.session.delta.astype(np.float32)})
        notice = UpdateSubmitted(training_id="plain", round=1, attempt=held.session.attempt,
                                 agent_id=cheater.agent_id,
                                 update_digest=await cheater.blobs.put(blob, owner=cheater.agent_id),
                                 num_examples=held.session.num_examples, received_model_version=0)
        signed = notice.model_copy(update={"signature": cheater.identity.sign(notice.signed_bytes()).hex()})
        await redis.xadd(Keys().update_stream, encode(signed))  # type: ignore[arg-type]

    cheater.secure._upload_masked = upload_plain  # type: ignore[method-assign]
    await start_training(redis, "plain", digits_config(rounds=1, clients_per_round=4, min_clients=3,
                                                       secure_aggregation=True, round_deadline_s=4))

    state = await wait_for_status(redis, "plain", {"completed", "failed"}, timeout_s=90)

    assert state.status == "completed", state.reason
    rejections = {k.decode(): int(v) for k, v in (await redis.hgetall(Keys().rejections)).items()}
    assert rejections.get("updates:bad_dtype", 0) == 1
    job = (await jobs_of(redis, "plain"))[0]
    assert cheater.agent_id not in [ref.agent_id for ref in job.updates]


async def test_a_phase_short_of_answers_restarts_the_round_with_a_new_session(
        redis: aioredis.Redis, system, make_agents) -> None:
    import json


    await system.start()
    agents = await make_agents(4)
    for agent in agents[:2]:  # these two ignore the first session's roster: 2 share senders < threshold 3
        original = agent.secure.handle

        async def handle(fields, *, _original=original) -> None:  # type: ignore[no-untyped-def]
            message = decode_secure_inbox_message(fields)
            if message.type == "secure_roster" and message.attempt == 1:
                return
            await _original(fields)

        agent.secure.handle = handle  # type: ignore[method-assign]
    await start_training(redis, "again", digits_config(rounds=1, clients_per_round=4, min_clients=3,
                                                       secure_aggregation=True, round_deadline_s=3))

    state = await wait_for_status(redis, "again", {"completed", "failed"}, timeout_s=90)

    assert state.status == "completed", state.reason
    kinds = [json.loads(f[b"m"])["kind"] for _id, f in await redis.xrange(Keys().event_stream)]
    assert kinds.count("secure_round_restarted") == 1
    job = (await jobs_of(redis, "again"))[0]
    assert job.secure is not None and job.secure.attempt == 2 and len(job.updates) >= 3


async def test_a_coordinator_killed_in_every_secure_phase_resumes_the_exchange(
        redis: aioredis.Redis, system, make_agents) -> None:
    """Kill the coordinator as soon as each phase is reached; the restarted one carries the same
    session on (nothing it stored is lost or counted twice) and the round commits the mean."""
    from federated_learning.coordination.state import TrainingState

    await system.start()
    agents = await make_agents(4)
    recorded = record_deltas(agents)
    # Each secure message an agent gets belongs to one coordinator phase; the agent answers only
    # after the test has killed and restarted the coordinator in that phase, so every phase is hit.
    phase_of_message = {"secure_roster": "shares", "secure_delivery": "masked", "secure_unmask": "unmask"}
    interrupted = {phase: asyncio.Event() for phase in phase_of_message.values()}
    for agent in agents:
        original = agent.secure.handle

        async def gated(fields, *, _original=original) -> None:  # type: ignore[no-untyped-def]
            phase = phase_of_message[decode_secure_inbox_message(fields).type]
            await asyncio.wait_for(interrupted[phase].wait(), timeout=30)
            await _original(fields)

        agent.secure.handle = gated  # type: ignore[method-assign]
    await start_training(redis, "crash", digits_config(rounds=1, clients_per_round=4, min_clients=3,
                                                       secure_aggregation=True))
    killed: list[str] = []
    deadline = asyncio.get_running_loop().time() + 60
    while asyncio.get_running_loop().time() < deadline:
        raw = await redis.get(Keys().training("crash"))
        state = TrainingState.model_validate_json(raw) if raw else None
        if state is not None and state.status.is_final:
            break
        phase = state.secure.phase.value if state is not None and state.secure is not None else None
        if phase is not None and phase not in killed:
            killed.append(phase)
            await system.kill("coordinator")
            await system.start("coordinator")
            if phase in interrupted:
                interrupted[phase].set()
        await asyncio.sleep(0.01)

    state = await wait_for_status(redis, "crash", {"completed", "failed"}, timeout_s=60)
    assert state.status == "completed", state.reason
    assert {"shares", "masked", "unmask"} <= set(killed), killed
    job = (await jobs_of(redis, "crash"))[0]
    assert job.secure is not None and job.secure.attempt == 1  # the same session went on
    committed = await model_of(redis, "crash", 1)
    expected = expected_model(await model_of(redis, "crash", 0), recorded, 1, [r.agent_id for r in job.updates])
    assert np.max(np.abs(committed - expected)) <= len(job.updates) / job.secure.session.scale + 1e-6
