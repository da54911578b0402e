"""A training whose privacy budget runs out ends with the reason, releasing nothing past it.

No training setting makes the budget small: each level's (epsilon, delta) is fixed and the
noise multiplier is calibrated so that exactly `rounds` releases fit. The budget can only
run out when the training's persisted ledger already holds releases, so the test seeds that
ledger (the same JSON the privacy manager writes) with two of three releases spent; the
first round's release then takes the last of the budget and the second is refused.
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from federated_learning.privacy.accountant import PrivacyAccountant, compute_noise_multiplier
from federated_learning.privacy.levels import privacy_targets
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import (
    AggregateReady,
    ModelReleased,
    VersionRecord,
)
from tests.integration.conftest import digits_config, start_training, wait_for_status

KEYS = Keys()
ROUNDS = 3


async def seed_spent_budget(redis: aioredis.Redis, training_id: str, releases: int) -> float:
    """Store a ledger for `training_id` that has `releases` of the level's releases charged."""
    target = privacy_targets("low")
    noise_multiplier = compute_noise_multiplier(target.epsilon, target.delta, 1.0, ROUNDS)
    accountant = PrivacyAccountant(target.epsilon, target.delta)
    accountant.step(noise_multiplier, 1.0, steps=releases)
    await redis.set(KEYS.privacy_budget(training_id), json.dumps(accountant.to_dict()))
    return noise_multiplier


async def test_exhausted_budget_fails_the_training_and_releases_no_further_model(
        redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(4)
    noise_multiplier = await seed_spent_budget(redis, "spent", releases=ROUNDS - 1)
    await start_training(redis, "spent", digits_config(rounds=ROUNDS, privacy_level="low"))

    state = await wait_for_status(redis, "spent", {"completed", "failed", "stopped"})

    assert state.status == "failed"
    assert state.reason is not None and "privacy budget exhausted" in state.reason, state.reason
    assert state.completed_rounds == 1
    releases = {int(r): ModelReleased.model_validate_json(v)
                for r, v in (await redis.hgetall(KEYS.release("spent"))).items()}
    assert sorted(releases) == [1], "round 0 is the initial model; nothing after round 1 is released"
    assert releases[1].privacy.epsilon_spent <= 8.0
    streamed = [ModelReleased.model_validate_json(f[b"m"]) for _id, f in await redis.xrange(KEYS.release_stream)]
    # a redelivered aggregate re-announces its recorded release, so a round may appear twice
    assert {r.round for r in streamed if r.training_id == "spent"} == {0, 1}
    records = [VersionRecord.model_validate_json(v) for v in (await redis.hgetall(KEYS.versions("spent"))).values()]
    assert sorted(r.version for r in records) == [0, 1]
    aggregates = [AggregateReady.model_validate_json(f[b"m"]) for _id, f in await redis.xrange(KEYS.aggregate_stream)]
    refused = [a for a in aggregates if a.training_id == "spent" and a.round == 2]
    assert refused, "round 2 was aggregated and then refused by the privacy manager"
    assert state.current_version == 1
    assert state.current_digest == releases[1].model_digest
    assert state.current_digest not in {a.model_digest for a in refused}
    ledger = PrivacyAccountant.from_dict(json.loads(await redis.get(KEYS.privacy_budget("spent"))))
    assert ledger.events[-1].to_dict() == {"kind": "gaussian", "noise_multiplier": noise_multiplier,
                                           "sample_rate": 1.0, "steps": ROUNDS}
    assert ledger.get_epsilon() <= 8.0
    events = [json.loads(f[b"m"]) for _id, f in await redis.xrange(KEYS.event_stream)]
    [refusal] = [e for e in events if e["kind"] == "release_refused"]
    assert refusal["round"] == 2 and "privacy budget exhausted" in refusal["message"]
