"""Automatic rollback end to end: a stretch of poisoned rounds, the policy rolls back, training recovers."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from agents.attacks import Attack
from federated_learning.coordination.state import TrainingState
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import RollbackTraining, encode
from tests.integration.conftest import digits_config, start_training, wait_for_status

KEYS = Keys()


async def rollback_events(redis: aioredis.Redis) -> list[dict]:
    events = [json.loads(f[b"m"]) for _id, f in await redis.xrange(KEYS.event_stream)]
    return [e for e in events if e["kind"] == "rollback"]


async def poison_until_rollback(redis: aioredis.Redis, training_id: str, agents: list) -> TrainingState:  # type: ignore[type-arg]
    """After four good rounds, every agent sign-flips until a rollback happens; then train to the end."""
    state = await wait_for_status(redis, training_id, {"running"})
    while state.completed_rounds < 4:
        state = await wait_for_status(redis, training_id, {"running"})
    for agent in agents:
        agent.attack = Attack.SIGN_FLIP
    for _ in range(600):
        if await rollback_events(redis):
            break
        await asyncio.sleep(0.05)
    for agent in agents:
        agent.attack = None
    return await wait_for_status(redis, training_id, {"completed", "failed"})


async def test_poisoned_rounds_trigger_a_rollback_to_the_best_version(redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    agents = await make_agents(8)
    await start_training(redis, "poison", digits_config(
        rounds=14, clients_per_round=8, min_clients=8,
        rollback={"performance_threshold": 0.1, "consecutive_degradations": 2}))

    state = await poison_until_rollback(redis, "poison", agents)

    assert state.status == "completed", state.reason
    [rollback, *_] = await rollback_events(redis)
    assert rollback["data"]["automatic"] is True
    assert rollback["data"]["to_version"] < rollback["data"]["from_version"]
    assert "below the best" in rollback["data"]["reason"]
    records = [json.loads(v) for v in (await redis.hgetall(KEYS.versions("poison"))).values()]
    after = min((r for r in records if r["version"] > rollback["data"]["from_version"]), key=lambda r: r["version"])
    assert after["parent_version"] == rollback["data"]["to_version"]  # training went on from the target
    assert state.final_evaluation is not None and state.final_evaluation.accuracy > 0.8
    events = [json.loads(f[b"m"]) for _id, f in await redis.xrange(KEYS.event_stream)]
    rules = {e["data"]["alert"]["rule"] for e in events if e["kind"] == "alert"}
    assert "rollback" in rules


async def test_operator_rollback_continues_from_the_chosen_version(redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(4)
    await start_training(redis, "manual", digits_config(rounds=6))
    state = await wait_for_status(redis, "manual", {"running"})
    while state.completed_rounds < 3:
        state = await wait_for_status(redis, "manual", {"running"})
    await redis.xadd(KEYS.control_stream, encode(RollbackTraining(training_id="manual", version=1)))  # type: ignore[arg-type]

    state = await wait_for_status(redis, "manual", {"completed", "failed"})

    assert state.status == "completed"
    [rollback] = await rollback_events(redis)
    assert rollback["data"]["to_version"] == 1 and rollback["data"]["automatic"] is False
    parents = {json.loads(v)["parent_version"] for v in (await redis.hgetall(KEYS.versions("manual"))).values()}
    assert 1 in parents


async def test_server_validation_scores_every_version_and_drives_the_rollback(
        redis: aioredis.Redis, system, make_agents, settings) -> None:
    import numpy as np

    from agents.data import make_client_datasets
    from federated_learning.protocol.messages import RoundMetrics

    _clients, test = make_client_datasets(8, "iid", 0)
    settings.validation_folder.mkdir(parents=True)
    np.savez(settings.validation_folder / "validation.npz", x=test.x, y=test.y)
    await system.start()
    agents = await make_agents(8)
    await start_training(redis, "srv", digits_config(
        rounds=14, clients_per_round=8, min_clients=8, validation_data="validation.npz",
        rollback={"performance_threshold": 0.1, "consecutive_degradations": 2}))
    await start_training(redis, "bad-validation", digits_config(validation_data="missing.npz"))

    state = await poison_until_rollback(redis, "srv", agents)

    assert state.status == "completed", state.reason
    metrics = [RoundMetrics.model_validate_json(m) for m in await redis.lrange(KEYS.training_metrics("srv"), 0, -1)]
    assert all(m.server_accuracy is not None for m in metrics)
    assert max(m.server_accuracy or 0 for m in metrics) > 0.85
    [rollback, *_] = await rollback_events(redis)
    assert "server" in rollback["data"]["reason"]
    failed = await wait_for_status(redis, "bad-validation", {"failed"})
    assert "missing.npz" in failed.reason


async def test_a_redelivered_operator_rollback_is_applied_once(redis: aioredis.Redis, settings) -> None:
    from federated_learning.coordination.state import RoundPhase, TrainingState
    from federated_learning.protocol.messages import PrivacyReport, TrainingStatus, VersionRecord
    from federated_learning.services.coordinator import Coordinator
    from federated_learning.services.runtime import ServiceContext

    coordinator = Coordinator(ServiceContext(redis=redis, settings=settings, service="coordinator", instance="0"))
    assert await coordinator.lease.acquire()
    for version in (0, 1):
        record = VersionRecord(training_id="again", version=version, round=version, parent_version=None,
                               model_digest=f"{version}" * 64, state_digest=None, checkpoint="", algorithm="fedavg",
                               contributors=[], num_examples=0, privacy=PrivacyReport(level="none", mechanism="none"),
                               created_at=0.0)
        await redis.hset(KEYS.versions("again"), str(version), record.model_dump_json())
    state = TrainingState(training_id="again", config=digits_config(rounds=9), status=TrainingStatus.RUNNING,
                          phase=RoundPhase.COLLECTING, round=3, completed_rounds=2, current_version=1,
                          current_digest="1" * 64, min_clients=2, clients_per_round=4, round_deadline_s=10,
                          privacy_level="none")
    await coordinator.store.save(state)
    command = RollbackTraining(training_id="again", version=0)

    for _delivery in range(2):
        await coordinator.on_rollback_request(command, "1700000000000-0")

    after = await coordinator.store.load("again")
    assert after is not None and after.round == 4 and after.current_version == 0
    assert len(await rollback_events(redis)) == 1
