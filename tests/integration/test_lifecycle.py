"""Training lifecycle: pause and resume with agent liveness, the concurrency queue, stop, retries."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import AgentJoined, Heartbeat, StopTraining, encode
from tests.integration.conftest import digits_config, start_training, wait_for_status

KEYS = Keys()


async def events_of(redis: aioredis.Redis, kind: str) -> list[dict]:
    events = [json.loads(f[b"m"]) for _id, f in await redis.xrange(KEYS.event_stream)]
    return [e for e in events if e["kind"] == kind]


async def test_training_pauses_without_enough_agents_and_resumes_when_they_join(
        redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(1)
    await start_training(redis, "p", digits_config(rounds=2, min_clients=2))

    paused = await wait_for_status(redis, "p", {"paused"})
    assert "only 1 agents alive" in paused.reason

    more = await make_agents(3, seed=1)
    assert more
    done = await wait_for_status(redis, "p", {"completed", "failed"})
    assert done.status == "completed", done.reason
    statuses = [e["data"]["status"] for e in await events_of(redis, "training_status")]
    assert statuses.index("paused") < len(statuses) - 1 - statuses[::-1].index("running")


async def test_trainings_beyond_the_concurrency_limit_wait_in_the_queue(
        redis: aioredis.Redis, system, make_agents, settings) -> None:
    system.settings = settings.model_copy(update={"max_concurrent_trainings": 1})
    await system.start()
    await make_agents(4)
    await start_training(redis, "first", digits_config(rounds=2))
    await start_training(redis, "second", digits_config(rounds=2))

    await wait_for_status(redis, "first", {"running"})
    second = await wait_for_status(redis, "second", {"queued"})
    assert second.status == "queued"
    assert (await wait_for_status(redis, "first", {"completed"})).status == "completed"
    assert (await wait_for_status(redis, "second", {"completed"})).status == "completed"


async def test_stopped_training_ends_with_the_reason(redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(3)
    await start_training(redis, "s", digits_config(rounds=500))
    await wait_for_status(redis, "s", {"running"})
    await redis.xadd(KEYS.control_stream, encode(StopTraining(training_id="s", reason="enough")))  # type: ignore[arg-type]

    state = await wait_for_status(redis, "s", {"stopped"})
    assert state.reason == "enough"
    assert await redis.scard(KEYS.active_trainings) == 0


async def test_round_without_answers_is_retried_with_a_new_selection_then_fails(
        redis: aioredis.Redis, system) -> None:
    silent = [f"silent-{i}" for i in range(6)]
    for agent in silent:
        await redis.xadd(KEYS.agent_stream, encode(AgentJoined(agent_id=agent, datasets={"digits": 5})))  # type: ignore[arg-type]

    async def beat() -> None:
        while True:
            for agent in silent:
                await redis.xadd(KEYS.agent_stream, encode(Heartbeat(agent_id=agent)))  # type: ignore[arg-type]
            await asyncio.sleep(0.2)

    beats = asyncio.create_task(beat())
    await system.start()
    try:
        await start_training(redis, "r", digits_config(rounds=2, clients_per_round=2, min_clients=2,
                                                       over_selection=1.0, round_deadline_s=0.5,
                                                       max_round_attempts=3))
        state = await wait_for_status(redis, "r", {"failed"}, timeout_s=30)
    finally:
        beats.cancel()
    assert "only 0 updates after 3 attempts" in state.reason
    retried = await events_of(redis, "round_retried")
    assert [e["data"]["attempt"] for e in retried] == [2, 3]
    assert len(state.selected) == 6  # every attempt asked agents not asked before


async def test_training_whose_rule_cannot_work_fails_at_start_with_the_reason(
        redis: aioredis.Redis, system) -> None:
    await system.start("coordinator")
    await start_training(redis, "k", digits_config(algorithm="krum", min_clients=3,
                                                   algorithm_params={"num_malicious_clients": 2}))
    await start_training(redis, "x", digits_config(algorithm="trimmed_mean",
                                                   algorithm_params={"beta": 0.7}))

    krum = await wait_for_status(redis, "k", {"failed"})
    trimmed = await wait_for_status(redis, "x", {"failed"})
    assert "needs at least 7 updates per round; min_clients is 3" in krum.reason
    assert "beta" in trimmed.reason


async def test_robust_rule_trains_through_the_pipeline(redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(6)
    await start_training(redis, "m", digits_config(algorithm="multikrum", clients_per_round=6, min_clients=5,
                                                   algorithm_params={"num_malicious_clients": 1,
                                                                     "num_clients_to_keep": 3}))
    state = await wait_for_status(redis, "m", {"completed", "failed"})
    assert state.status == "completed", state.reason


async def test_hourly_cap_pauses_a_training_once_every_agent_used_its_tasks(
        redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(3)
    await start_training(redis, "cap", digits_config(rounds=5, clients_per_round=3, min_clients=3,
                                                     max_tasks_per_agent_per_hour=2, selection="importance"))
    state = await wait_for_status(redis, "cap", {"paused", "completed"})
    assert state.status == "paused" and state.completed_rounds == 2
    assert "hourly cap of 2 tasks" in state.reason


async def test_coordinator_resumes_a_round_interrupted_between_commit_and_next_round(
        redis: aioredis.Redis, system, make_agents) -> None:
    from federated_learning.coordination.state import RoundPhase, TrainingState

    await system.start()
    await make_agents(3)
    await start_training(redis, "resume", digits_config(rounds=30))
    state = await wait_for_status(redis, "resume", {"running"})
    while state.completed_rounds < 1:
        state = await wait_for_status(redis, "resume", {"running"}, timeout_s=20)
    await system.kill("coordinator")
    raw = await redis.get(KEYS.training("resume"))
    crashed = TrainingState.model_validate_json(raw)
    crashed.round = crashed.completed_rounds  # as if killed after committing, before the next round opened
    crashed.phase = RoundPhase.IDLE
    await redis.set(KEYS.training("resume"), crashed.model_dump_json())
    await system.start("coordinator")

    done = await wait_for_status(redis, "resume", {"completed", "failed"})
    assert done.status == "completed", done.reason
