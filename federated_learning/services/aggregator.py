"""Aggregator worker: takes aggregation jobs, runs the training's rule, writes the result.

Any worker of the consumer group takes any job; a job taken over from a dead worker
gives the same model because the updates are read in the job's fixed order and the
rules are deterministic (identical for any thread count).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from dataclasses import asdict
from enum import Enum
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from prometheus_client import Counter, Histogram

from federated_learning.aggregation.layouts import (
    carried_maximum,
    carried_names,
    for_rules,
    restore_dtype,
    trained_names,
)
from federated_learning.bus.blobs import BlobMissing
from federated_learning.bus.consumer import StreamConsumer
from federated_learning.config import load_settings
from federated_learning.monitoring.anomaly import MIN_UPDATES_FOR_SCORES, score_slabs
from federated_learning.privacy.errors import PrivacyError
from federated_learning.privacy.mechanisms import clip_update
from federated_learning.privacy.secure_session import unmask_weighted_mean
from federated_learning.protocol.banks import (
    decode_bank_upload,
    decode_bank_version,
    encode_bank_version,
)
from federated_learning.protocol.keys import GROUP_AGGREGATOR
from federated_learning.protocol.messages import (
    ASYNC_ALGORITHMS,
    AggregateReady,
    AggregationJob,
    MalformedMessage,
    MemoryBankModel,
    SecureAggregationSpec,
    Severity,
    UpdateRef,
    decode,
    encode,
)
from federated_learning.protocol.secure_messages import (
    MASKED_DTYPES,
    MASKED_LAYER,
    SecureUnmaskShares,
)
from federated_learning.protocol.tensors import (
    STATE_DTYPES,
    InvalidTensor,
    decode_layers,
    encode_layers,
    is_float,
    spec_of,
)
from federated_learning.protocol.updates import decode_update, is_compressed
from federated_learning.services.runtime import ServiceContext, open_context, serve, setup_logging
from federated_learning.types import NamedLayers

log = logging.getLogger(__name__)

JOBS = Counter("fl_aggregation_jobs_total", "Aggregation jobs", ["algorithm", "outcome"])
SECONDS = Histogram("fl_aggregation_seconds", "Seconds spent in the aggregation rule",
                    ["algorithm"], buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))


class AggregationFailed(RuntimeError):
    """A job that cannot produce a model (every update invalid, or the rule refused)."""


class Aggregator:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.consumer = StreamConsumer(
            ctx.redis, GROUP_AGGREGATOR, f"aggregator-{ctx.instance}",
            {ctx.keys.job_stream: self.on_job},
            dead_letter_stream=ctx.dead_letter_stream, count=1,
            claim_idle_ms=ctx.settings.claim_idle_ms,
            on_forged_id=ctx.forged_stream_id,
        )

    async def run(self, *, burst: bool = False) -> None:
        await self.consumer.run(self.ctx.stop, burst=burst)

    async def on_job(self, _id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            job = decode(AggregationJob, fields)
        except MalformedMessage as exc:
            await self.ctx.reject("jobs", "malformed", exc.reason)
            return
        try:
            ready = await self.aggregate(job)
        except (AggregationFailed, ValueError, BlobMissing, InvalidTensor) as exc:
            JOBS.labels(job.algorithm, "failed").inc()
            await self.ctx.emit("aggregation_failed", f"job {job.job_key}: {exc}",
                                severity=Severity.CRITICAL, training_id=job.training_id,
                                round=job.round, attempt=job.attempt)
            return
        await self.ctx.redis.xadd(self.ctx.keys.aggregate_stream, encode(ready))
        JOBS.labels(job.algorithm, "ok").inc()

    async def _load_updates(self, job: AggregationJob, base: NamedLayers, trained: list[str],
                            slabs: list[np.ndarray], carried: dict[str, list[np.ndarray]],
                            *, rows: Rows) -> list[int]:
        """Fill row k of every slab with update k's trained layer (as ``rows`` says) and collect its
        integer layers in ``carried``; return the indices of usable updates."""
        usable: list[int] = []
        own_bases: dict[str, NamedLayers] = {}
        for k, ref in enumerate(job.updates):
            try:
                layers = await self._update_on_base(ref, base, own_bases)
            except (BlobMissing, InvalidTensor) as exc:
                await self.ctx.reject("jobs", getattr(exc, "reason", "blob_missing"), str(exc),
                                      training_id=job.training_id, round=job.round,
                                      agent_id=ref.agent_id)
                continue
            if job.clip_norm is not None:
                layers = clip_update(base, layers, job.clip_norm, job.clip_norm_type)
            row = len(usable)
            for slab, name in zip(slabs, trained, strict=True):
                if rows is Rows.DELTAS:
                    np.subtract(layers[name].reshape(-1), base[name].reshape(-1), out=slab[row],
                                dtype=slab.dtype)
                elif rows is Rows.GRADIENTS:
                    np.subtract(base[name].reshape(-1), layers[name].reshape(-1), out=slab[row],
                                dtype=slab.dtype)
                else:
                    slab[row] = layers[name].reshape(-1)
            for name, values in carried.items():
                values.append(layers[name])
            usable.append(k)
        return usable

    async def _score_updates(self, job: AggregationJob, global_layers: list[np.ndarray],
                             slabs: list[np.ndarray], refs: list[UpdateRef]) -> tuple[float, dict[str, float]]:
        """Robust z-scores of update norms and directions; report suspicious agents. Returns the
        mean norm (0.0 when not scored) and each agent's contribution: examples x max(0, cosine
        to the median update), or its examples when the updates are too few or too large to score."""
        from federated_learning.aggregation import create_strategy

        if len(refs) < MIN_UPDATES_FOR_SCORES or sum(s.size for s in slabs) > ANOMALY_MAX_VALUES:
            return 0.0, {ref.agent_id: float(ref.num_examples) for ref in refs}
        median = create_strategy("median").aggregate_slabs(global_layers, slabs, [r.num_examples for r in refs])
        flags = score_slabs(global_layers, slabs, median, [r.agent_id for r in refs])
        suspicious = [asdict(flag) for flag in flags if flag.suspicious]
        if suspicious:
            await self.ctx.emit("update_anomaly", f"{len(suspicious)} of {len(flags)} updates look anomalous",
                                severity=Severity.WARNING, training_id=job.training_id, round=job.round,
                                flags=suspicious)
        contributions = {ref.agent_id: ref.num_examples * max(0.0, flag.cosine)
                         for ref, flag in zip(refs, flags, strict=True)}
        return float(np.mean([flag.norm for flag in flags])), contributions

    async def _load_secure_mean(self, job: AggregationJob, spec: SecureAggregationSpec, base: NamedLayers,
                                slabs: list[np.ndarray], *, gradients: bool) -> int | None:
        """Remove the masks of a secure round; row 0 of ``slabs`` becomes base + the mean delta
        (minus the mean delta, FedSGD's gradient, when ``gradients``).
        Returns how many updates were within the clip norm when the session counts them."""
        max_bytes = self.ctx.settings.max_blob_bytes
        masked = {}
        for ref in job.updates:
            layers = decode_layers(await self.ctx.blobs.get(ref.digest, owner=ref.agent_id), max_bytes=max_bytes,
                                   allowed_dtypes=MASKED_DTYPES)
            masked[ref.agent_id] = np.asarray(layers[MASKED_LAYER], dtype=np.uint32)
        raw = await self.ctx.redis.hmget(
            self.ctx.keys.secure_exchange(job.training_id, job.round, spec.attempt, "unmask"), spec.responders)
        responses = [SecureUnmaskShares.model_validate_json(v) for v in raw if v is not None]
        try:
            unmasked = await asyncio.to_thread(unmask_weighted_mean, spec, masked, responses)
        except PrivacyError as exc:
            raise AggregationFailed(f"secure aggregation: {exc}") from exc
        offset = 0
        for slab, name in zip(slabs, trained_names(base), strict=True):
            layer, mean_delta = base[name], unmasked.mean[offset: offset + base[name].size]
            slab[0] = -mean_delta if gradients else layer.reshape(-1) + mean_delta
            offset += layer.size
        return unmasked.unclipped_count

    async def _update_on_base(self, ref: UpdateRef, base: NamedLayers,
                              own_bases: dict[str, NamedLayers]) -> NamedLayers:
        """The update as a model on the job's base: ``base + (update - the model it was trained from)``."""
        max_bytes = self.ctx.settings.max_blob_bytes
        data = await self.ctx.blobs.get(ref.digest, owner=ref.agent_id)
        if ref.model_digest is None or is_compressed(data):
            return decode_update(data, spec_of(base), max_bytes=max_bytes, base=base)
        if ref.model_digest not in own_bases:
            own_bases[ref.model_digest] = decode_layers(await self.ctx.blobs.get(ref.model_digest),
                                                        max_bytes=max_bytes)
        own = own_bases[ref.model_digest]
        model = decode_update(data, spec_of(base), max_bytes=max_bytes)
        return {name: rebased(base[name], model[name], own[name]) for name in model}

    async def aggregate(self, job: AggregationJob) -> AggregateReady:
        from federated_learning.aggregation import allocate_slabs, create_strategy

        if job.memory_bank is not None:
            return await self.merge_banks(job, job.memory_bank)
        base = decode_layers(await self.ctx.blobs.get(job.base_digest),
                             max_bytes=self.ctx.settings.max_blob_bytes)
        trained = trained_names(base)
        if not trained:
            raise AggregationFailed("the model has no float layer to aggregate")
        global_layers: list[NDArray[np.generic]] = [for_rules(base[name]) for name in trained]
        strategy = create_strategy(job.algorithm, **job.algorithm_params)
        if job.state_digest:
            strategy.load_state_dict(decode_layers(await self.ctx.blobs.get(job.state_digest),
                                                   max_bytes=self.ctx.settings.max_blob_bytes,
                                                   allowed_dtypes=STATE_DTYPES))
        rows = rows_for(job.algorithm)
        unclipped_count = None
        # Integer layers follow the updates only where the updates are seen whole and unclipped.
        carried: dict[str, list[np.ndarray]] = {
            name: [] for name in carried_names(base)
            if job.carry_integers and job.secure is None and job.clip_norm is None}
        if job.secure is not None:
            # One row: the survivors' unmasked weighted mean, weighted by all their examples.
            slabs = allocate_slabs(global_layers, 1)
            unclipped_count = await self._load_secure_mean(job, job.secure, base, slabs,
                                                             gradients=rows is Rows.GRADIENTS)
            refs = job.updates
            weights = [sum(ref.num_examples for ref in refs)]
        else:
            slabs = allocate_slabs(global_layers, len(job.updates))
            usable = await self._load_updates(job, base, trained, slabs, carried, rows=rows)
            if not usable:
                raise AggregationFailed("no usable update")
            if len(usable) < len(job.updates):
                slabs = [slab[: len(usable)] for slab in slabs]
            refs = [job.updates[k] for k in usable]
            weights = [ref.num_examples for ref in refs]
        started = time.perf_counter()
        new_layers = strategy.aggregate_slabs(
            global_layers, slabs, weights,
            client_metrics=[dict(ref.metrics) for ref in refs][: len(weights)],
            staleness=[max(0, job.base_version - ref.model_version) for ref in refs][: len(weights)],
        )
        seconds = time.perf_counter() - started
        SECONDS.labels(job.algorithm).observe(seconds)
        reference = global_layers if rows is Rows.MODELS else [np.zeros_like(layer) for layer in global_layers]
        # A secure round has no individual updates to score: that is what it hides.
        if job.secure is None:
            norm_mean, contributions = await self._score_updates(job, reference, slabs, refs)
        else:  # nothing individual to score: each survivor is credited its examples
            norm_mean, contributions = 0.0, {ref.agent_id: float(ref.num_examples) for ref in refs}
        aggregated = dict(zip(trained, new_layers, strict=True))
        model = {name: restore_dtype(aggregated[name], layer) if name in aggregated
                 else carried_maximum(carried.get(name, []), layer) for name, layer in base.items()}
        for name in trained:  # a float16 layer can overflow when rounded back (max 65504)
            if not np.isfinite(model[name]).all():
                raise AggregationFailed(f"layer '{name}' does not fit {model[name].dtype.name}: "
                                        "the aggregate holds values out of its range")
        model_digest = await self.ctx.blobs.put(encode_layers(model))
        state = strategy.state_dict()
        state_digest = await self.ctx.blobs.put(encode_layers(state)) if state else None
        log.info("job %s: %s over %d updates in %.3fs", job.job_key, job.algorithm, len(refs), seconds)
        return AggregateReady(
            training_id=job.training_id, round=job.round, attempt=job.attempt,
            base_version=job.base_version, model_digest=model_digest, state_digest=state_digest,
            contributors=[ref.agent_id for ref in refs],
            num_examples=sum(ref.num_examples for ref in refs),
            max_client_examples=max(ref.num_examples for ref in refs), aggregation_seconds=seconds,
            update_norm_mean=norm_mean, unclipped_count=unclipped_count, contributions=contributions,
            worker=self.consumer.consumer,
        )


    async def merge_banks(self, job: AggregationJob, spec: MemoryBankModel) -> AggregateReady:
        """A memory-bank round: the base bank (weighted by the examples it stands for) and the
        uploaded banks, merged into at most ``global_bank_size`` rows."""
        from federated_learning.memory_bank import merge_banks

        max_bytes = self.ctx.settings.max_blob_bytes
        base, base_examples = decode_bank_version(await self.ctx.blobs.get(job.base_digest), spec,
                                                  max_bytes=max_bytes)
        banks: list[NDArray[np.float32]] = [base] if base.shape[0] else []
        weights = [max(base_examples, 1)] if base.shape[0] else []
        refs: list[UpdateRef] = []
        for ref in job.updates:
            try:
                banks.append(decode_bank_upload(await self.ctx.blobs.get(ref.digest, owner=ref.agent_id), spec,
                                                max_bytes=max_bytes))
            except (BlobMissing, InvalidTensor) as exc:
                await self.ctx.reject("jobs", getattr(exc, "reason", "blob_missing"), str(exc),
                                      training_id=job.training_id, round=job.round, agent_id=ref.agent_id)
                continue
            weights.append(ref.num_examples)
            refs.append(ref)
        if not refs:
            raise AggregationFailed("no usable bank")
        started = time.perf_counter()
        merged = await asyncio.to_thread(
            merge_banks, banks, weights, spec.global_bank_size, method=spec.aggregation_strategy,
            weighted=spec.weighted, seed=spec.seed * 1_000_003 + job.round)
        seconds = time.perf_counter() - started
        SECONDS.labels(job.algorithm).observe(seconds)
        examples = base_examples + sum(ref.num_examples for ref in refs)
        model_digest = await self.ctx.blobs.put(encode_bank_version(merged, examples))
        log.info("job %s: %d banks (%d rows) merged into %d rows in %.3fs", job.job_key, len(banks),
                 sum(bank.shape[0] for bank in banks), merged.shape[0], seconds)
        return AggregateReady(
            training_id=job.training_id, round=job.round, attempt=job.attempt,
            base_version=job.base_version, model_digest=model_digest,
            contributors=[ref.agent_id for ref in refs], num_examples=sum(ref.num_examples for ref in refs),
            max_client_examples=max(ref.num_examples for ref in refs), aggregation_seconds=seconds,
            contributions={ref.agent_id: float(ref.num_examples) for ref in refs},
            worker=self.consumer.consumer,
        )


def rebased(base: np.ndarray, model: np.ndarray, own: np.ndarray) -> np.ndarray:
    """A layer trained from ``own`` moved onto ``base``: base + (model - own). Counters too, so a
    stale update's step count adds to the current one (a bool layer is taken as it is)."""
    if model.dtype == np.bool_:
        return model
    moved = base + (model.astype(np.float64) - own) if is_float(model.dtype.name) else base + (model - own)
    return np.asarray(moved).astype(model.dtype)


class Rows(Enum):
    """What a slab row holds for a rule: the agent's model, its delta from the base, or FedSGD's
    gradient (base - model: the agent took one local step, which the server takes again at its
    own learning rate)."""

    MODELS = "models"
    DELTAS = "deltas"
    GRADIENTS = "gradients"


def rows_for(algorithm: str) -> Rows:
    """FedBuff folds deltas (each from the version its agent started from); FedSGD steps along
    gradients; every other rule combines models."""
    if algorithm in ASYNC_ALGORITHMS:
        return Rows.DELTAS
    return Rows.GRADIENTS if algorithm == "fedsgd" else Rows.MODELS


ANOMALY_MAX_VALUES = 50_000_000
"""Update anomaly scores are skipped above this many slab values (K x d) to keep rounds fast."""


def configure_numba(settings_cores: int, data_dir: Path) -> None:
    """Cache compiled kernels in the data folder; use the configured cores (at most what exists)."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str((data_dir / "numba-cache").resolve()))


WARM_UP_RULES = ("fedavg", "fedavgm", "fedadam", "krum", "trimmed_mean", "median")


def warm_up() -> None:
    """Load the kernels (from the on-disk cache after the first start) before the first round."""
    from federated_learning.aggregation import create_strategy

    started = time.perf_counter()
    base: list[NDArray[np.generic]] = [np.zeros(8, np.float32)]
    updates: list[list[NDArray[np.generic]]] = [[np.full(8, k, np.float32)] for k in range(7)]
    for name in WARM_UP_RULES:
        create_strategy(name).aggregate(base, updates, [1] * len(updates))
    warm_up_memory_banks()
    log.info("aggregation kernels ready in %.2fs", time.perf_counter() - started)


def warm_up_memory_banks() -> None:
    """Compile (or load) the k-center kernels, the parallel rescan included, so that a
    training's first bank merge does not pay the compile time (seconds) inside its round."""
    from federated_learning.memory_bank import merge_banks
    from federated_learning.memory_bank.kcenter import PARALLEL_MIN_ROWS

    rng = np.random.default_rng(0)
    banks = [rng.standard_normal((PARALLEL_MIN_ROWS // 2 + 1, 4)).astype(np.float32) for _ in range(2)]
    for weighted in (True, False):
        merge_banks(banks, [1, 2], 8, weighted=weighted)


async def _main(args: argparse.Namespace) -> None:
    settings = load_settings(args.config)
    setup_logging(settings.log_level, f"aggregator-{args.instance}")
    configure_numba(settings.cpu_cores, settings.data_dir)
    from federated_learning.aggregation import configure_threads

    configure_threads(settings.cpu_cores)
    warm_up()
    ctx = await open_context(settings, "aggregator", args.instance)
    aggregator = Aggregator(ctx)
    await serve(ctx, aggregator.run)


def main() -> None:
    parser = argparse.ArgumentParser(description="federated learning aggregator worker")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--instance", default="0")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
