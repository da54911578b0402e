"""The privacy manager against a real valkey-server: a noised release leaves no un-noised
aggregate on the bus, and never deletes a committed version's blob."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import redis.asyncio as aioredis

from federated_learning.config import Settings
from federated_learning.coordination.state import TrainingState
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import (
    AggregateReady,
    ModelReleased,
    PrivacyReport,
    TrainingStatus,
    VersionRecord,
    encode,
)
from federated_learning.protocol.tensors import digest_of, encode_layers, spec_of
from federated_learning.records.trainings import TrainingStore
from federated_learning.services.privacy import PrivacyManager
from federated_learning.services.runtime import ServiceContext
from tests.integration.conftest import digits_config

KEYS = Keys()
MODEL = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}


async def private_training(redis: aioredis.Redis) -> None:
    state = TrainingState(training_id="dp", config=digits_config(rounds=3, privacy_level="low"), min_clients=2,
                          clients_per_round=4, round_deadline_s=10.0, privacy_level="low", clip_norm=2.0,
                          layer_spec=spec_of(MODEL), status=TrainingStatus.RUNNING, round=1)
    await TrainingStore(redis, KEYS).create(state, queued=False)


async def release(redis: aioredis.Redis, settings: Settings, aggregate: bytes) -> ModelReleased:
    """Store the aggregate, hand it to the privacy manager, and return its (newest) release."""
    digest = digest_of(aggregate)
    await redis.set(KEYS.blob(digest), aggregate)
    ready = AggregateReady(training_id="dp", round=1, attempt=1, base_version=0, model_digest=digest,
                           contributors=["a", "b"], num_examples=20, max_client_examples=10,
                           aggregation_seconds=0.01)
    await redis.xadd(KEYS.aggregate_stream, encode(ready))
    ctx = ServiceContext(redis=redis, settings=settings, service="privacy", instance="0")
    await PrivacyManager(ctx).consumer.run(asyncio.Event(), burst=True)
    [(_id, fields)] = await redis.xrevrange(KEYS.release_stream, count=1)
    return ModelReleased.model_validate_json(fields[b"m"])


async def test_a_noised_release_discards_the_unnoised_aggregate(redis: aioredis.Redis, settings: Settings) -> None:
    await private_training(redis)
    aggregate = encode_layers(MODEL)

    released = await release(redis, settings, aggregate)

    assert released.privacy.mechanism == "gaussian" and released.model_digest != digest_of(aggregate)
    assert not await redis.exists(KEYS.blob(digest_of(aggregate)))
    assert await redis.exists(KEYS.blob(released.model_digest))

    again = await release(redis, settings, aggregate)  # a redone job stores it again: gone again

    assert again == released and await redis.xlen(KEYS.release_stream) == 2
    assert not await redis.exists(KEYS.blob(digest_of(aggregate)))


async def test_an_aggregate_that_is_a_committed_versions_model_is_kept(redis: aioredis.Redis,
                                                                       settings: Settings) -> None:
    await private_training(redis)
    aggregate = encode_layers(MODEL)
    record = VersionRecord(training_id="dp", version=0, round=0, parent_version=None,
                           model_digest=digest_of(aggregate), state_digest=None, checkpoint="v000000",
                           algorithm="fedavg", contributors=[], num_examples=0,
                           privacy=PrivacyReport(level="none", mechanism="none"), created_at=time.time())
    await redis.hset(KEYS.versions("dp"), "0", record.model_dump_json())

    released = await release(redis, settings, aggregate)

    assert released.model_digest != digest_of(aggregate)
    assert await redis.exists(KEYS.blob(digest_of(aggregate)))
