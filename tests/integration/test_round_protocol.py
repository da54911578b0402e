"""The round protocol end to end inside one event loop, against a real valkey-server."""

from __future__ import annotations

import numpy as np
import pytest
import redis.asyncio as aioredis

from federated_learning.bus.blobs import RedisBlobStore
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import AggregationJob, RoundMetrics, Task, VersionRecord
from federated_learning.protocol.tensors import decode_layers
from tests.integration.conftest import digits_config, start_training, wait_for_status


async def test_training_runs_all_rounds_and_commits_one_version_per_round(redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(6)
    await start_training(redis, "t1", digits_config(rounds=3))

    state = await wait_for_status(redis, "t1", {"completed", "failed"})

    assert state.status == "completed", state.reason
    keys = Keys()
    versions = sorted(VersionRecord.model_validate_json(v).version
                      for v in (await redis.hgetall(keys.versions("t1"))).values())
    assert versions == [0, 1, 2, 3]
    metrics = [RoundMetrics.model_validate_json(m) for m in await redis.lrange(keys.training_metrics("t1"), 0, -1)]
    assert [m.round for m in metrics] == [1, 2, 3]
    assert all(m.participants >= 2 for m in metrics)
    assert state.final_evaluation is not None
    assert state.final_evaluation.accuracy > metrics[0].eval_accuracy


async def test_private_training_releases_noised_versions_and_charges_the_budget(
        redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(5)
    await start_training(redis, "dp", digits_config(rounds=2, privacy_level="low"))

    state = await wait_for_status(redis, "dp", {"completed", "failed"})

    assert state.status == "completed", state.reason
    assert state.clip_norm == 2.0
    keys = Keys()
    records = sorted((VersionRecord.model_validate_json(v) for v in (await redis.hgetall(keys.versions("dp"))).values()),
                     key=lambda r: r.version)
    assert [r.privacy.mechanism for r in records] == ["none", "gaussian", "gaussian"]
    assert 0 < records[1].privacy.epsilon_spent < records[2].privacy.epsilon_spent <= 8.0
    assert await redis.exists(keys.privacy_budget("dp"))
    assert state.epsilon_spent == records[2].privacy.epsilon_spent


async def test_buffered_asynchronous_training_flushes_full_buffers_with_staleness(
        redis: aioredis.Redis, system, make_agents, monkeypatch) -> None:
    kept: list[tuple[str, str | None]] = []

    async def keep(_store: RedisBlobStore, blobs: list[tuple[str, str | None]]) -> None:
        kept.extend(blobs)  # the check below recomputes each job from its uploads

    monkeypatch.setattr(RedisBlobStore, "discard", keep)
    await system.start()
    await make_agents(8)
    await start_training(redis, "async", digits_config(algorithm="fedbuff", rounds=4, clients_per_round=6,
                                                       algorithm_params={"buffer_size": 4}))

    state = await wait_for_status(redis, "async", {"completed", "failed"})

    assert state.status == "completed", state.reason
    assert kept, "committed buffers' uploads are discarded"
    keys = Keys()
    records = sorted((VersionRecord.model_validate_json(v) for v in (await redis.hgetall(keys.versions("async"))).values()),
                     key=lambda r: r.version)
    assert [r.version for r in records] == [0, 1, 2, 3, 4]
    assert all(len(r.contributors) >= 4 for r in records[1:])
    jobs = [AggregationJob.model_validate_json(f[b"m"]) for _id, f in await redis.xrange(keys.job_stream)]
    assert any(ref.model_version < job.base_version for job in jobs for ref in job.updates), \
        "agents kept training while buffers were aggregated, so some updates are stale"

    async def layers(digest: str, owner: str | None = None) -> np.ndarray:
        return decode_layers(await redis.get(keys.blob(digest, owner)),
                             max_bytes=1 << 20)["dense.weight"].astype(np.float64)

    stale_job = next(j for j in jobs if any(r.model_version < j.base_version for r in j.updates))
    base = await layers(stale_job.base_digest)
    total = sum(r.num_examples for r in stale_job.updates)
    expected = base.copy()
    for ref in stale_job.updates:
        own_base = base if ref.model_digest is None else await layers(ref.model_digest)
        discount = 1.0 / np.sqrt(1.0 + stale_job.base_version - ref.model_version)
        expected += ref.num_examples / total * discount * (await layers(ref.digest, ref.agent_id) - own_base)
    committed = next(r for r in records if r.round == stale_job.round)
    np.testing.assert_allclose(await layers(committed.model_digest), expected, rtol=1e-4, atol=1e-5)
    metrics = [RoundMetrics.model_validate_json(m) for m in await redis.lrange(keys.training_metrics("async"), 0, -1)]
    assert state.final_evaluation is not None
    assert state.final_evaluation.accuracy > (metrics[0].eval_accuracy or 0.0)


async def test_stateful_server_optimisers_keep_their_state_across_rounds(
        redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(4)
    await start_training(redis, "adam", digits_config(rounds=3, algorithm="fedadam",
                                                      algorithm_params={"eta": 0.01, "tau": 0.001}))
    await start_training(redis, "prox", digits_config(rounds=2, algorithm="fedprox",
                                                      local={"epochs": 1, "proximal_mu": 0.1}))

    adam = await wait_for_status(redis, "adam", {"completed", "failed"})
    prox = await wait_for_status(redis, "prox", {"completed", "failed"})

    assert adam.status == "completed", adam.reason
    assert prox.status == "completed", prox.reason
    states = {VersionRecord.model_validate_json(v).state_digest
              for v in (await redis.hgetall(Keys().versions("adam"))).values()}
    assert len(states - {None}) == 3  # a new optimiser state after every round


async def test_round_whose_aggregation_never_finishes_fails_after_the_attempts(
        redis: aioredis.Redis, system, make_agents) -> None:
    await system.start("coordinator", "privacy", "versions")
    await make_agents(3)
    await start_training(redis, "stuck", digits_config(rounds=2, round_deadline_s=0.5, max_round_attempts=2))

    state = await wait_for_status(redis, "stuck", {"failed", "completed"}, timeout_s=30)

    assert state.status == "failed"
    assert "no version after 2 aggregation attempts" in state.reason
    assert await redis.xlen(Keys().job_stream) == 2


async def test_compressed_updates_train_and_shrink_the_upload(redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(4)
    await start_training(redis, "topk", digits_config(rounds=3, local={"compression": "top_k",
                                                                       "compression_fraction": 0.1}))
    await start_training(redis, "q8", digits_config(rounds=3, local={"compression": "q8"}))

    # A 650-parameter model: the safetensors header (~400 bytes) is a large part of each upload.
    for training_id, max_ratio in (("topk", 0.5), ("q8", 0.6)):
        state = await wait_for_status(redis, training_id, {"completed", "failed"})
        assert state.status == "completed", state.reason
        metrics = [RoundMetrics.model_validate_json(m)
                   for m in await redis.lrange(Keys().training_metrics(training_id), 0, -1)]
        assert all(0 < m.upload_bytes < max_ratio * m.dense_bytes for m in metrics), training_id
        assert state.final_evaluation is not None and state.final_evaluation.accuracy > 0.5


async def test_local_dp_training_noises_on_the_agents(redis: aioredis.Redis, system, make_agents) -> None:
    await system.start()
    await make_agents(4)
    await start_training(redis, "ldp", digits_config(rounds=2, privacy_level="low", privacy_mode="local"))

    state = await wait_for_status(redis, "ldp", {"completed", "failed"})

    assert state.status == "completed", state.reason
    records = [VersionRecord.model_validate_json(v) for v in (await redis.hgetall(Keys().versions("ldp"))).values()]
    assert {r.privacy.mechanism for r in records if r.version > 0} == {"gaussian-local"}
    tasks = [Task.model_validate_json(f[b"m"]) for _id, f in await redis.xrange(Keys().inbox_stream("agent-000"))]
    assert tasks and all(t.settings.local_noise_std and t.settings.clip_norm == 2.0 for t in tasks if t.kind == "train")


@pytest.mark.parametrize("mode", ["central", "local"])
async def test_laplace_training_clips_in_l1_and_composes_to_the_level(
        redis: aioredis.Redis, system, make_agents, mode: str) -> None:
    await system.start()
    await make_agents(4)
    training_id = f"laplace-{mode}"
    await start_training(redis, training_id, digits_config(rounds=2, privacy_level="low", privacy_mode=mode,
                                                           noise_mechanism="laplace"))

    state = await wait_for_status(redis, training_id, {"completed", "failed"})

    assert state.status == "completed", state.reason
    records = sorted((VersionRecord.model_validate_json(v)
                      for v in (await redis.hgetall(Keys().versions(training_id))).values()), key=lambda r: r.version)
    assert [r.privacy.mechanism for r in records[1:]] == ["laplace" if mode == "central" else "laplace-local"] * 2
    assert records[1].privacy.epsilon_spent == pytest.approx(4.0, rel=1e-6)  # epsilon 8 over 2 releases
    assert 7.9 < records[2].privacy.epsilon_spent <= 8.0
    tasks = [Task.model_validate_json(f[b"m"]) for _id, f in await redis.xrange(Keys().inbox_stream("agent-000"))]
    train = [t for t in tasks if t.kind == "train"]
    assert train and all(t.settings.clip_norm_type == "l1" and t.settings.local_noise_std is None for t in train)
    assert all((t.settings.local_laplace_scale is not None) == (mode == "local") for t in train)
