"""The aggregator worker against a real valkey-server: each update checked once, invalid ones
refused by agent and reason, the rest aggregated; scores after the aggregate."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

import numpy as np
import pytest
import redis.asyncio as aioredis

from federated_learning.aggregation import create_strategy
from federated_learning.config import Settings
from federated_learning.monitoring.anomaly import score_slabs
from federated_learning.privacy.compression import CompressedUpdate, CompressionMethod, quantize
from federated_learning.protocol.events import Event
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import (
    AggregateReady,
    AggregationJob,
    PrivacyReport,
    UpdateAccepted,
    UpdateRef,
    UpdateRefused,
    VersionRecord,
)
from federated_learning.protocol.tensors import decode_layers, digest_of, encode_layers, spec_of
from federated_learning.protocol.updates import decode_update, encode_compressed
from federated_learning.services import job_updates
from federated_learning.services.aggregator import Aggregator
from federated_learning.services.runtime import ServiceContext

KEYS = Keys()
D = 40


def aggregator_for(redis: aioredis.Redis, settings: Settings) -> Aggregator:
    return Aggregator(ServiceContext(redis=redis, settings=settings, service="aggregator", instance="0"))


async def put(redis: aioredis.Redis, data: bytes, owner: str | None = None) -> str:
    digest = digest_of(data)
    await redis.set(KEYS.blob(digest, owner), data)
    return digest


async def run_job(redis: aioredis.Redis, aggregator: Aggregator, job: AggregationJob) -> list[AggregateReady]:
    await redis.xadd(KEYS.job_stream, {b"m": job.model_dump_json().encode()})
    await aggregator.run(burst=True)
    return [AggregateReady.model_validate_json(fields[b"m"]) for _id, fields in await redis.xrange(KEYS.aggregate_stream)]


async def events(redis: aioredis.Redis, kind: str) -> list[Event]:
    found = [Event.model_validate_json(fields[b"m"]) for _id, fields in await redis.xrange(KEYS.event_stream)]
    return [event for event in found if event.kind == kind]


async def refusals(redis: aioredis.Redis) -> list[UpdateRefused]:
    """What the aggregator reported to the coordinator (which counts and reports the refusals)."""
    return [UpdateRefused.model_validate_json(fields[b"m"])
            for _id, fields in await redis.xrange(KEYS.refused_update_stream)]


async def record_version_zero(redis: aioredis.Redis, model_digest: str) -> None:
    """Training "t"'s version 0 in the version index: the model the read-ahead checks uploads against."""
    record = VersionRecord(training_id="t", version=0, round=0, parent_version=None, model_digest=model_digest,
                           state_digest=None, checkpoint="", algorithm="fedavg", contributors=[], num_examples=0,
                           privacy=PrivacyReport(level="none", mechanism="none"), created_at=0.0)
    await redis.hset(KEYS.versions("t"), "0", record.model_dump_json())


def job_of(base_digest: str, refs: list[UpdateRef], **fields: object) -> AggregationJob:
    return AggregationJob.model_validate({"training_id": "t", "round": 1, "attempt": 1, "algorithm": "fedavg",
                                          "base_version": 0, "base_digest": base_digest,
                                          "updates": [ref.model_dump() for ref in refs], **fields})


async def test_invalid_updates_are_refused_by_agent_and_reason_and_the_rest_aggregated(
        redis: aioredis.Redis, settings: Settings) -> None:
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(4, D // 4)).astype(np.float32), "b": np.zeros(3, np.float32)}
    base_digest = await put(redis, encode_layers(base))
    good = {f"good-{k}": {"w": base["w"] + k, "b": np.full(3, k, np.float32)} for k in range(3)}
    refs = [UpdateRef(agent_id=agent, digest=await put(redis, encode_layers(model), agent), num_examples=10 * (k + 1))
            for k, (agent, model) in enumerate(good.items())]
    delta = [rng.normal(size=(4, D // 4)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    refs.append(UpdateRef(agent_id="good-q8", digest=await put(redis, encode_compressed(quantize(delta, 8, rng)),
                                                               "good-q8"), num_examples=5))
    nan = {"w": np.full((4, D // 4), np.nan, np.float32), "b": np.zeros(3, np.float32)}
    forged = encode_layers(good["good-0"])
    huge = CompressedUpdate(CompressionMethod.TOP_K, ((100_000_000,), (3,)),
                            {"indices": np.array([0], np.uint32), "values": np.array([1.0], np.float32)})
    bad = {
        "not-finite": (await put(redis, encode_layers(nan), "not-finite"), "not_finite"),
        "wrong-shape": (await put(redis, encode_layers({"w": np.zeros(D, np.float32), "b": base["b"]}),
                                  "wrong-shape"), "bad_shape"),
        "wrong-dtype": (await put(redis, encode_layers({"w": base["w"].astype(np.float64), "b": base["b"]}),
                                  "wrong-dtype"), "bad_dtype"),
        "declares-huge": (await put(redis, encode_compressed(huge), "declares-huge"), "bad_shape"),
        "missing": ("0" * 64, "blob_missing"),
    }
    wrong_digest = "f" * 64
    await redis.set(KEYS.blob(wrong_digest, "hash-mismatch"), forged)
    bad["hash-mismatch"] = (wrong_digest, "hash_mismatch")
    refs += [UpdateRef(agent_id=agent, digest=digest, num_examples=7) for agent, (digest, _reason) in bad.items()]
    aggregator = aggregator_for(redis, settings)

    [ready] = await run_job(redis, aggregator, job_of(base_digest, refs, carry_integers=False))

    assert ready.contributors == ["good-0", "good-1", "good-2", "good-q8"]
    refused = {refusal.agent_id: refusal.reason for refusal in await refusals(redis)}
    assert refused == {agent: reason for agent, (_digest, reason) in bad.items()}
    model = decode_layers(await redis.get(KEYS.blob(ready.model_digest)), max_bytes=1 << 20)
    rows = [good["good-0"]["w"], good["good-1"]["w"], good["good-2"]["w"], await q8_model(redis, refs[3], base)]
    expected = np.average(np.stack(rows).astype(np.float64), axis=0, weights=[10, 20, 30, 5])
    np.testing.assert_allclose(model["w"], expected, rtol=1e-6)


async def q8_model(redis: aioredis.Redis, ref: UpdateRef, base: dict[str, np.ndarray]) -> np.ndarray:
    """The compressed update as a model: the base plus its decompressed delta."""
    return decode_update(await redis.get(KEYS.blob(ref.digest, ref.agent_id)), spec_of(base), max_bytes=1 << 20,
                         base=base)["w"]


async def test_accepted_updates_are_read_once_before_the_job_and_the_job_uses_the_checked_bytes(
        redis: aioredis.Redis, settings: Settings) -> None:
    base = {"w": np.zeros(D, np.float32)}
    base_digest = await put(redis, encode_layers(base))
    await record_version_zero(redis, base_digest)
    good = {f"a{k}": encode_layers({"w": np.full(D, k + 1, np.float32)}) for k in range(3)}
    refs = [UpdateRef(agent_id=agent, digest=await put(redis, data, agent), num_examples=1)
            for agent, data in good.items()]
    nan = await put(redis, encode_layers({"w": np.full(D, np.nan, np.float32)}), "nan")
    refs.append(UpdateRef(agent_id="nan", digest=nan, num_examples=1))
    for ref in refs:
        await redis.xadd(KEYS.accepted_update_stream, {b"m": UpdateAccepted(
            training_id="t", round=1, agent_id=ref.agent_id, update_digest=ref.digest,
            model_version=0).model_dump_json().encode()})
    aggregator = aggregator_for(redis, settings)
    await aggregator.reader.run(aggregator.ctx.stop, burst=True)

    assert [(r.agent_id, r.reason, r.round) for r in await refusals(redis)] == [("nan", "not_finite", 1)]
    assert len(aggregator.cache) == 4 and aggregator.cache.bytes_kept == sum(map(len, good.values()))
    # An agent may overwrite its upload key: the job aggregates the bytes that were checked.
    await redis.set(KEYS.blob(refs[0].digest, "a0"), encode_layers({"w": np.full(D, 100, np.float32)}))

    [ready] = await run_job(redis, aggregator, job_of(base_digest, refs))

    assert ready.contributors == ["a0", "a1", "a2"]
    assert len(await refusals(redis)) == 1, "a refusal is reported once, when the update is read"
    model = decode_layers(await redis.get(KEYS.blob(ready.model_digest)), max_bytes=1 << 20)
    np.testing.assert_allclose(model["w"], np.full(D, 2.0, np.float32))
    assert len(aggregator.cache) == 0 and aggregator.cache.bytes_kept == 0, "the job released its round"
    # An upload of a round whose job has started is the job's to read and report, not the read-ahead's.
    late = await put(redis, encode_layers({"w": np.full(D, np.inf, np.float32)}), "late")
    await redis.xadd(KEYS.accepted_update_stream, {b"m": UpdateAccepted(
        training_id="t", round=1, agent_id="late", update_digest=late, model_version=0).model_dump_json().encode()})
    await aggregator.reader.run(aggregator.ctx.stop, burst=True)
    assert len(await refusals(redis)) == 1 and len(aggregator.cache) == 0


async def test_a_job_with_fewer_valid_updates_than_its_minimum_fails(redis: aioredis.Redis,
                                                                      settings: Settings) -> None:
    base = {"w": np.zeros(D, np.float32)}
    base_digest = await put(redis, encode_layers(base))
    refs = [UpdateRef(agent_id=f"a{k}", digest=await put(redis, encode_layers({"w": np.full(D, k, np.float32)}),
                                                         f"a{k}"), num_examples=1) for k in range(3)]
    refs.append(UpdateRef(agent_id="gone", digest="0" * 64, num_examples=1))
    aggregator = aggregator_for(redis, settings)

    ready = await run_job(redis, aggregator, job_of(base_digest, refs, min_updates=4))

    assert ready == []
    [failed] = await events(redis, "aggregation_failed")
    assert "3 of 4 updates are valid; the job needs at least 4" in failed.message
    assert [refusal.agent_id for refusal in await refusals(redis)] == ["gone"]


async def test_update_scores_follow_the_aggregate_and_equal_the_slab_scores(redis: aioredis.Redis,
                                                                            settings: Settings) -> None:
    rng = np.random.default_rng(1)
    base = {"w": rng.normal(size=(5, 8)).astype(np.float32), "b": rng.normal(size=8).astype(np.float32)}
    base_digest = await put(redis, encode_layers(base))
    models = [{name: layer + 0.01 * rng.normal(size=layer.shape).astype(np.float32) for name, layer in base.items()}
              for _ in range(7)]
    models[2] = {name: layer + 5.0 for name, layer in base.items()}  # boosted
    refs = [UpdateRef(agent_id=f"a{k}", digest=await put(redis, encode_layers(model), f"a{k}"), num_examples=k + 1)
            for k, model in enumerate(models)]
    aggregator = aggregator_for(redis, settings)

    [ready] = await run_job(redis, aggregator, job_of(base_digest, refs))

    global_layers = [base["w"], base["b"]]
    slabs = [np.stack([m["w"].reshape(-1) for m in models]), np.stack([m["b"] for m in models])]
    median = create_strategy("median").aggregate_slabs(global_layers, slabs, [1] * 7)
    flags = score_slabs(global_layers, slabs, median, [ref.agent_id for ref in refs])
    [anomaly] = await events(redis, "update_anomaly")
    assert anomaly.data["flags"] == [
        {**asdict(flag), "reasons": list(flag.reasons)} for flag in flags if flag.suspicious]
    assert [flag["agent_id"] for flag in anomaly.data["flags"]] == ["a2"]
    assert ready.contributions == {}
    assert ready.update_norm_mean == pytest.approx(np.mean([flag.norm for flag in flags]), rel=1e-12)
    credit = {k.decode(): float(v) for k, v in (await redis.hgetall(KEYS.agent_contributions)).items()}
    assert credit == pytest.approx({ref.agent_id: ref.num_examples * max(0.0, flag.cosine)
                                    for ref, flag in zip(refs, flags, strict=True)})

    await run_job(redis, aggregator, job_of(base_digest, refs, attempt=2))  # the round again: credited once

    assert {k.decode(): float(v) for k, v in (await redis.hgetall(KEYS.agent_contributions)).items()} == credit


async def test_uploads_the_read_ahead_could_not_read_are_left_to_the_job(redis: aioredis.Redis, settings: Settings,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost bus while the read-ahead fetches must not leave a job waiting for it forever."""
    base = {"w": np.zeros(D, np.float32)}
    base_digest = await put(redis, encode_layers(base))
    await record_version_zero(redis, base_digest)
    digest = await put(redis, encode_layers({"w": np.ones(D, np.float32)}), "a0")
    aggregator = aggregator_for(redis, settings)
    waiting: list[object] = []

    async def lost_bus(*_args: object, **_kwargs: object) -> list[object]:
        waiting.append(aggregator.cache.get((digest, "a0")))  # what a job would be waiting for
        raise ConnectionError("the bus went away")

    monkeypatch.setattr(aggregator.ctx.blobs, "get_each", lost_bus)
    accepted = UpdateAccepted(training_id="t", round=1, agent_id="a0", update_digest=digest, model_version=0)
    with pytest.raises(ConnectionError):
        await aggregator.cache.take([accepted], aggregator.pool)
    [future] = waiting
    assert isinstance(future, asyncio.Future) and future.done() and future.result() is None
    assert aggregator.cache.get((digest, "a0")) is None and len(aggregator.cache) == 0
    monkeypatch.undo()
    [ready] = await run_job(redis, aggregator, job_of(base_digest, [UpdateRef(agent_id="a0", digest=digest,
                                                                              num_examples=1)]))
    assert ready.contributors == ["a0"]


async def test_the_model_a_worker_wrote_is_the_next_jobs_base_without_a_read_and_gives_the_same_result(
        redis: aioredis.Redis, settings: Settings) -> None:
    rng = np.random.default_rng(5)
    base = {"w": rng.normal(size=D).astype(np.float32), "step": np.array([3], np.int64)}
    base_digest = await put(redis, encode_layers(base))

    def uploads() -> list[tuple[str, bytes]]:
        return [(f"a{k}", encode_compressed(quantize([rng.normal(size=D).astype(np.float32)], 8, rng)))
                for k in range(3)]

    first = [UpdateRef(agent_id=agent, digest=await put(redis, data, agent), num_examples=k + 1)
             for k, (agent, data) in enumerate(uploads())]
    aggregator = aggregator_for(redis, settings)
    [one] = await run_job(redis, aggregator, job_of(base_digest, first))
    second = [UpdateRef(agent_id=agent, digest=await put(redis, data, agent), num_examples=k + 1)
              for k, (agent, data) in enumerate(uploads())]
    written = await redis.get(KEYS.blob(one.model_digest))
    await redis.delete(KEYS.blob(one.model_digest))  # only the worker's own copy can serve now

    [_, two] = await run_job(redis, aggregator, job_of(one.model_digest, second, round=2, base_version=1))

    await redis.set(KEYS.blob(one.model_digest), written)
    await redis.delete(KEYS.aggregate_stream)
    [again] = await run_job(redis, aggregator_for(redis, settings),
                            job_of(one.model_digest, second, round=2, base_version=1))
    assert two.model_digest == again.model_digest, "a worker that reads the base writes the same model"
    assert not await events(redis, "aggregation_failed")


async def test_a_folded_job_checks_what_the_read_ahead_did_not_and_reports_each_refusal_once(
        redis: aioredis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """FedAvg over 4 updates (too few to score) folds them, 2 per group here: an update fetched at
    job time has its values checked then, one the read-ahead refused is reported once, and the
    mean is the valid updates'."""
    monkeypatch.setattr(job_updates, "FOLDED_GROUP", 2)
    base = {"w": np.zeros(D, np.float32)}
    base_digest = await put(redis, encode_layers(base))
    await record_version_zero(redis, base_digest)
    uploads = {"a0": np.full(D, 1.0, np.float32), "nan-ahead": np.full(D, np.nan, np.float32),
               "a1": np.full(D, 4.0, np.float32), "nan-late": np.full(D, np.nan, np.float32)}
    refs = [UpdateRef(agent_id=agent, digest=await put(redis, encode_layers({"w": values}), agent),
                      num_examples=k + 1) for k, (agent, values) in enumerate(uploads.items())]
    for ref in refs[:2]:  # the read-ahead sees the first two only
        await redis.xadd(KEYS.accepted_update_stream, {b"m": UpdateAccepted(
            training_id="t", round=1, agent_id=ref.agent_id, update_digest=ref.digest,
            model_version=0).model_dump_json().encode()})
    aggregator = aggregator_for(redis, settings)
    await aggregator.reader.run(aggregator.ctx.stop, burst=True)
    assert [(r.agent_id, r.reason) for r in await refusals(redis)] == [("nan-ahead", "not_finite")]

    [ready] = await run_job(redis, aggregator, job_of(base_digest, refs))

    assert ready.contributors == ["a0", "a1"] and ready.num_examples == 1 + 3
    assert sorted((r.agent_id, r.reason) for r in await refusals(redis)) == [
        ("nan-ahead", "not_finite"), ("nan-late", "not_finite")]
    model = decode_layers(await redis.get(KEYS.blob(ready.model_digest)), max_bytes=1 << 20)
    np.testing.assert_allclose(model["w"], np.full(D, (1.0 * 1 + 4.0 * 3) / 4, np.float32), rtol=1e-6)


async def test_a_folded_job_whose_sum_is_not_finite_fails_and_leaves_no_decoding_behind(
        redis: aioredis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_updates, "FOLDED_GROUP", 1)
    base = {"w": np.zeros(D, np.float32)}
    base_digest = await put(redis, encode_layers(base))
    refs = [UpdateRef(agent_id=f"a{k}", digest=await put(redis, encode_layers({"w": np.full(D, k, np.float32)}),
                                                          f"a{k}"), num_examples=1) for k in range(3)]
    aggregator = aggregator_for(redis, settings)
    folds = 0
    original_add = job_updates.WeightedSum.add

    def failing_add(self: job_updates.WeightedSum, rows: list[list[np.ndarray]], weights: list[float]) -> None:
        nonlocal folds
        folds += 1
        if folds == 1:
            raise ValueError("layer 0: the weighted sum of the updates is not finite")
        original_add(self, rows, weights)

    monkeypatch.setattr(job_updates.WeightedSum, "add", failing_add)

    assert await run_job(redis, aggregator, job_of(base_digest, refs)) == []

    [failed] = await events(redis, "aggregation_failed")
    assert "not finite" in failed.message and folds == 1
    assert not [task for task in asyncio.all_tasks() if task is not asyncio.current_task() and not task.done()]
