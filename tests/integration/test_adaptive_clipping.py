"""Adaptive quantile clipping in a running training, against a real valkey-server."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import ModelReleased, RoundMetrics, UpdateSubmitted
from tests.integration.conftest import digits_config, start_training, wait_for_status


async def round_metrics(redis: aioredis.Redis, training_id: str) -> list[RoundMetrics]:
    return [RoundMetrics.model_validate_json(m)
            for m in await redis.lrange(Keys().training_metrics(training_id), 0, -1)]


@pytest.mark.parametrize(("initial_clip", "direction"), [(0.01, 1), (100.0, -1)])
async def test_clip_norm_moves_towards_the_quantile_of_the_update_norms(
        redis: aioredis.Redis, system, make_agents, initial_clip: float, direction: int) -> None:
    await system.start()
    await make_agents(4)
    training_id = f"adaptive-{direction + 1}"
    await start_training(redis, training_id, digits_config(
        rounds=3, clients_per_round=4, local={"epochs": 1, "batch_size": 8, "learning_rate": 0.1,
                                              "clip_norm": initial_clip},
        adaptive_clipping={"target_quantile": 0.5, "learning_rate": 0.5}))

    state = await wait_for_status(redis, training_id, {"completed", "failed"})

    assert state.status == "completed", state.reason
    clips = [m.clip_norm for m in await round_metrics(redis, training_id)]
    assert clips[0] == pytest.approx(initial_clip)
    assert state.clip_norm is not None
    steps = [b / a for a, b in zip([*clips, state.clip_norm], [*clips, state.clip_norm][1:], strict=False)]
    # every update was clipped (tiny C) or none was (huge C): C moves by about exp(+-0.25) a round
    assert all((step > 1.0) if direction > 0 else (step < 1.0) for step in steps), steps
    notices = [UpdateSubmitted.model_validate_json(v)
               for v in (await redis.hgetall(Keys().round_updates(training_id, 1))).values()]
    assert {n.unclipped for n in notices} == {direction < 0}


async def test_a_secure_round_unmasks_only_the_count_of_unclipped_updates(
        redis: aioredis.Redis, system, make_agents) -> None:
    """With secure aggregation no agent's bit travels in the clear: the aggregator unmasks their
    sum with the mean, the release carries it, and the clip norm moves by it."""
    await system.start()
    await make_agents(4)
    await start_training(redis, "secure-adaptive", digits_config(
        rounds=2, clients_per_round=4, min_clients=3, secure_aggregation=True,
        local={"epochs": 1, "batch_size": 8, "learning_rate": 0.1, "clip_norm": 100.0},
        adaptive_clipping={"target_quantile": 0.5, "learning_rate": 0.5}))

    state = await wait_for_status(redis, "secure-adaptive", {"completed", "failed"}, timeout_s=90)

    assert state.status == "completed", state.reason
    notices = [UpdateSubmitted.model_validate_json(v)
               for v in (await redis.hgetall(Keys().round_updates("secure-adaptive", 1))).values()]
    assert notices and {n.unclipped for n in notices} == {None}
    releases = [ModelReleased.model_validate_json(v)
                for v in (await redis.hgetall(Keys().release("secure-adaptive"))).values()]
    assert releases and all(r.unclipped_count == len(r.contributors) for r in releases)  # C = 100 clips none
    clips = [m.clip_norm for m in await round_metrics(redis, "secure-adaptive")]
    assert state.clip_norm is not None and state.clip_norm < clips[-1] < clips[0] == pytest.approx(100.0)
