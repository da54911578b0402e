"""Aggregator worker: takes aggregation jobs, runs the training's rule, writes the result.

Any worker of the consumer group takes any job; a job taken over from a dead worker
gives the same model because the updates are read in the job's fixed order and the
rules are deterministic (identical for any thread count).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import WatchError

from federated_learning.aggregation.inputs import (
    PreparedUpdate,
    Rows,
    UpdateLayout,
    folds_updates,
    rows_for,
)
from federated_learning.aggregation.layouts import (
    carried_maximum,
    carried_names,
    restore_dtype,
    trained_names,
)
from federated_learning.aggregation.streaming import WeightedSum
from federated_learning.bus.blobs import BlobMissing
from federated_learning.bus.consumer import run_consumers
from federated_learning.config import Settings
from federated_learning.monitoring.anomaly import score_against_median, scores_updates
from federated_learning.privacy.errors import PrivacyError
from federated_learning.privacy.secure_session import unmask_weighted_mean
from federated_learning.protocol.banks import (
    decode_bank_upload,
    decode_bank_version,
    encode_bank_version,
)
from federated_learning.protocol.keys import GROUP_AGGREGATOR
from federated_learning.protocol.messages import (
    AggregateReady,
    AggregationJob,
    MemoryBankModel,
    SecureAggregationSpec,
    Severity,
    UpdateAccepted,
    UpdateRef,
    UpdateRefused,
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
)
from federated_learning.records.versions import VersionIndex
from federated_learning.services.job_updates import AggregationFailed, JobUpdates
from federated_learning.services.process_memory import retain_freed_memory
from federated_learning.services.runtime import ServiceContext, service_main
from federated_learning.services.update_cache import UpdateCache, describe_refusal
from federated_learning.types import BlobDigest, NamedLayers

log = logging.getLogger(__name__)

JOBS = Counter("fl_aggregation_jobs_total", "Aggregation jobs", ["algorithm", "outcome"])
CACHED_BYTES = Gauge("fl_aggregator_cached_update_bytes", "Bytes of checked accepted updates kept for their jobs")
SECONDS = Histogram("fl_aggregation_seconds", "Seconds spent in the aggregation rule",
                    ["algorithm"], buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))


ACCEPTED_PER_READ = 128
"""Accepted updates read (and fetched concurrently) at once."""
REFUSED_MAXLEN = 100_000
CONTRIBUTION_MARKER_TTL_S = 7 * 24 * 3600
"""How long the marker that a round's contributions were credited is kept (a redelivered job's
scores are not credited twice)."""


class Aggregator:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.consumers = ctx.cell_consumers(GROUP_AGGREGATOR, lambda cell: cell.job_stream, self.on_job, count=1)
        self.consumer = self.consumers[0]
        self.cache = UpdateCache(ctx.blobs, VersionIndex(ctx.redis, ctx.keys),
                                 max_bytes=ctx.settings.aggregator_cache_bytes,
                                 max_blob_bytes=ctx.settings.max_blob_bytes)
        # Accepted updates are read in batches by a consumer of their own: a job (one at a time, so
        # that workers share them) does not hold them up, and a job awaits those still being read.
        self.readers = ctx.cell_consumers(GROUP_AGGREGATOR, lambda cell: cell.accepted_update_stream,
                                          self.on_accepted, batch_handler=self.on_accepted_batch,
                                          count=ACCEPTED_PER_READ)
        self.reader = self.readers[0]
        self._pool: ThreadPoolExecutor | None = None
        self._scoring: set[asyncio.Task[None]] = set()
        self.updates = JobUpdates(ctx.blobs, self.cache, lambda: self.pool, self._refuse,
                                  max_blob_bytes=ctx.settings.max_blob_bytes)
        # The model this worker wrote last, by digest: usually the next round's base.
        self._written: tuple[BlobDigest, NamedLayers] | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        """``cpu_cores`` threads that check, decode and score updates (NumPy and Numba release the GIL)."""
        if self._pool is None:
            cores = self.ctx.settings.cpu_cores
            self._pool = ThreadPoolExecutor(cores, thread_name_prefix=f"aggregator-{self.ctx.instance}",
                                            initializer=use_cores, initargs=(cores,))
        return self._pool

    async def run(self, *, burst: bool = False) -> None:
        try:
            if burst:  # the accepted updates first, as they would have arrived before their job
                await run_consumers(self.readers, self.ctx.stop, burst=True)
                await run_consumers(self.consumers, self.ctx.stop, burst=True)
            else:
                await run_consumers([*self.readers, *self.consumers], self.ctx.stop)
        finally:
            await self.finish_scoring()
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None
            self.ctx.blobs.close()

    async def finish_scoring(self) -> None:
        """Wait for the update scores still being computed after their jobs' aggregates were written."""
        while self._scoring:
            await asyncio.gather(*self._scoring)

    async def on_accepted(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        await self.on_accepted_batch([(entry_id, fields)])

    async def on_accepted_batch(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Read accepted updates whole (hash, values) while their round collects; report the invalid ones."""
        accepted: list[UpdateAccepted] = []
        for _entry_id, fields in entries:
            if (notice := await self.ctx.decoded(UpdateAccepted, fields, "accepted")) is not None:
                accepted.append(notice)
        for notice, problem in await self.cache.take(accepted, self.pool):
            await self._report_refusal(notice.training_id, notice.round, notice.agent_id, notice.update_digest,
                                       problem)
        CACHED_BYTES.set(self.cache.bytes_kept)

    async def _report_refusal(self, training_id: str, round_number: int, agent_id: str, digest: str,
                              problem: BlobMissing | InvalidTensor) -> None:
        """Tell the coordinator an accepted update is invalid: it counts the refusal (once) and,
        while the round collects, withdraws the update."""
        reason, detail = describe_refusal(problem, digest)
        await self.ctx.redis.xadd(self.ctx.keys.for_training(training_id).refused_update_stream, encode(UpdateRefused(
            training_id=training_id, round=round_number, agent_id=agent_id, update_digest=digest,
            reason=reason, detail=detail[:1000])), maxlen=REFUSED_MAXLEN, approximate=True)

    async def on_job(self, _id: bytes, fields: dict[bytes, bytes]) -> None:
        job = await self.ctx.decoded(AggregationJob, fields, "jobs")
        if job is None:
            return
        try:
            ready = await self.aggregate(job)
        except (AggregationFailed, ValueError, BlobMissing, InvalidTensor) as exc:
            JOBS.labels(job.algorithm, "failed").inc()
            await self.ctx.emit("aggregation_failed", f"job {job.job_key}: {exc}",
                                severity=Severity.CRITICAL, training_id=job.training_id,
                                round=job.round, attempt=job.attempt)
            return
        await self.ctx.redis.xadd(self.ctx.keys.for_training(job.training_id).aggregate_stream, encode(ready))
        JOBS.labels(job.algorithm, "ok").inc()
        self.cache.release(job.training_id, job.round)
        CACHED_BYTES.set(self.cache.bytes_kept)

    async def _refuse(self, job: AggregationJob, ref: UpdateRef, exc: BlobMissing | InvalidTensor) -> None:
        await self._report_refusal(job.training_id, job.round, ref.agent_id, ref.digest, exc)

    def _start_scoring(self, job: AggregationJob, layout: UpdateLayout, refs: list[UpdateRef],
                       prepared: list[PreparedUpdate]) -> None:
        """Score the updates after the aggregate is written (the round does not wait for the median)."""
        task = asyncio.create_task(self._score_updates(job, layout, refs, prepared))
        self._scoring.add(task)
        task.add_done_callback(self._scoring.discard)

    async def _score_updates(self, job: AggregationJob, layout: UpdateLayout, refs: list[UpdateRef],
                             prepared: list[PreparedUpdate]) -> None:
        """Robust z-scores of update norms and directions: report suspicious agents, and credit each
        agent examples x max(0, cosine to the median update), once per round."""
        try:
            flags = await asyncio.get_running_loop().run_in_executor(
                self.pool, score_against_median, layout.reference, [update.rows for update in prepared],
                [ref.agent_id for ref in refs])
            suspicious = [asdict(flag) for flag in flags if flag.suspicious]
            if suspicious:
                await self.ctx.emit("update_anomaly", f"{len(suspicious)} of {len(flags)} updates look anomalous",
                                    severity=Severity.WARNING, training_id=job.training_id, round=job.round,
                                    flags=suspicious)
            await self._credit(job, {ref.agent_id: ref.num_examples * max(0.0, flag.cosine)
                                     for ref, flag in zip(refs, flags, strict=True)})
        except Exception:
            log.exception("job %s: scoring the updates failed", job.job_key)

    async def _credit(self, job: AggregationJob, contributions: dict[str, float]) -> None:
        keys = self.ctx.keys.for_training(job.training_id)  # the marker and the counters in one slot
        marker = keys.applied("aggregator", f"contributions/{job.training_id}/{job.round}")
        async with self.ctx.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(marker)
                # GET, not EXISTS: a cluster pipeline splits EXISTS by slot and answers with itself.
                if await pipe.get(marker) is not None:
                    return
                pipe.multi()  # type: ignore[no-untyped-call]
                for agent_id, contribution in contributions.items():
                    pipe.hincrbyfloat(keys.agent_contributions, agent_id, contribution)
                pipe.set(marker, 1, ex=CONTRIBUTION_MARKER_TTL_S)
                await pipe.execute()
            except WatchError:  # another worker credited this round meanwhile
                return

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

    async def _base_model(self, digest: BlobDigest) -> NamedLayers:
        """A job's base model: the one this worker wrote last when the digest names it (the
        previous round's aggregate, as a rule), else read, checked and decoded from the blob store.
        The digest is of exactly those layers' encoding, so both give the same arrays."""
        if self._written is not None and self._written[0] == digest:
            return self._written[1]
        return decode_layers(await self.ctx.blobs.get(digest), max_bytes=self.ctx.settings.max_blob_bytes)

    def _keep_written(self, digest: BlobDigest, model: dict[str, NDArray[np.generic]]) -> None:
        kept: NamedLayers = {}
        for name, layer in model.items():
            layer.setflags(write=False)  # a job reads its base; nothing may change a kept one
            kept[name] = layer  # type: ignore[assignment]  # integer layers too, as decode_layers gives them
        self._written = (digest, kept)

    async def aggregate(self, job: AggregationJob) -> AggregateReady:
        """The job's aggregate, stored; the update scores follow in the background (``finish_scoring``)."""
        from federated_learning.aggregation import allocate_slabs, create_strategy

        if job.memory_bank is not None:
            return await self.merge_banks(job, job.memory_bank)
        base = await self._base_model(job.base_digest)
        rows = rows_for(job.algorithm)
        scoring = scores_updates(len(job.updates), sum(layer.size for name, layer in base.items()
                                                       if is_float(layer.dtype.name)))
        # Integer layers follow the updates only where the updates are seen whole and unclipped.
        layout = UpdateLayout(
            base=base, rows=rows, max_bytes=self.ctx.settings.max_blob_bytes,
            carried=tuple(carried_names(base)) if job.carry_integers and job.secure is None
            and job.clip_norm is None else (),
            clip_norm=job.clip_norm, clip_norm_type=job.clip_norm_type, measure_norms=scoring)
        if not layout.trained:
            raise AggregationFailed("the model has no float layer to aggregate")
        global_layers: list[NDArray[np.generic]] = list(layout.global_layers)
        strategy = create_strategy(job.algorithm, **job.algorithm_params)
        if job.state_digest:
            strategy.load_state_dict(decode_layers(await self.ctx.blobs.get(job.state_digest),
                                                   max_bytes=self.ctx.settings.max_blob_bytes,
                                                   allowed_dtypes=STATE_DTYPES))
        unclipped_count = None
        prepared: list[PreparedUpdate] = []
        carried_layers: list[dict[str, NDArray[np.generic]]] = []
        one_row = None
        if job.secure is not None:
            # One row: the survivors' unmasked weighted mean, weighted by all their examples.
            one_row = allocate_slabs(global_layers, 1)
            unclipped_count = await self._load_secure_mean(job, job.secure, base, one_row,
                                                             gradients=rows is Rows.GRADIENTS)
            refs = job.updates
            weights = [sum(ref.num_examples for ref in refs)]
        elif folds_updates(job.algorithm, scoring):
            # The rule needs only the weighted mean: one row again, folded from the updates.
            refs, total, carried_layers = await self.updates.fold(job, layout)
            one_row = allocate_slabs(global_layers, 1)
            for slab, mean in zip(one_row, total.mean(), strict=True):
                slab[0] = mean
            weights = [sum(ref.num_examples for ref in refs)]
        else:
            refs, prepared = await self.updates.load(job, layout)
            weights = [ref.num_examples for ref in refs]
            carried_layers = [update.carried for update in prepared]
        metrics = [dict(ref.metrics) for ref in refs][: len(weights)]
        staleness = [max(0, job.base_version - ref.model_version) for ref in refs][: len(weights)]
        started = time.perf_counter()
        if one_row is not None:
            new_layers = strategy.aggregate_slabs(global_layers, one_row, weights, client_metrics=metrics,
                                                  staleness=staleness)
        else:
            new_layers = strategy.aggregate(global_layers, [list(update.rows) for update in prepared], weights,
                                            client_metrics=metrics, staleness=staleness)
        seconds = time.perf_counter() - started
        SECONDS.labels(job.algorithm).observe(seconds)
        carried = {name: [layers[name] for layers in carried_layers] for name in layout.carried}
        aggregated = dict(zip(layout.trained, new_layers, strict=True))
        model = {name: restore_dtype(aggregated[name], layer) if name in aggregated
                 else carried_maximum(carried.get(name, []), layer) for name, layer in base.items()}
        for name in layout.trained:  # a float16 layer can overflow when rounded back (max 65504)
            if not np.isfinite(model[name]).all():
                raise AggregationFailed(f"layer '{name}' does not fit {model[name].dtype.name}: "
                                        "the aggregate holds values out of its range")
        model_digest = await self.ctx.blobs.put(encode_layers(model))
        self._keep_written(model_digest, model)
        state = strategy.state_dict()
        state_digest = await self.ctx.blobs.put(encode_layers(state)) if state else None
        # A secure round has no individual updates to score: that is what it hides. Unscored
        # updates are credited their examples.
        scored = scoring and scores_updates(len(prepared), sum(layer.size for layer in global_layers))
        log.info("job %s: %s over %d updates in %.3fs", job.job_key, job.algorithm, len(refs), seconds)
        ready = AggregateReady(
            training_id=job.training_id, round=job.round, attempt=job.attempt,
            base_version=job.base_version, model_digest=model_digest, state_digest=state_digest,
            contributors=[ref.agent_id for ref in refs],
            num_examples=sum(ref.num_examples for ref in refs),
            max_client_examples=max(ref.num_examples for ref in refs), aggregation_seconds=seconds,
            update_norm_mean=float(np.mean([update.norm for update in prepared])) if scored else 0.0,
            unclipped_count=unclipped_count,
            contributions={} if scored else {ref.agent_id: float(ref.num_examples) for ref in refs},
            worker=self.consumer.consumer,
        )
        if scored:
            self._start_scoring(job, layout, refs, prepared)
        return ready

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
        loaded = await self.ctx.blobs.get_each(
            [(ref.digest, ref.agent_id) for ref in job.updates],
            lambda _k, data: decode_bank_upload(data, spec, max_bytes=max_bytes), executor=self.pool)
        for ref, bank in zip(job.updates, loaded, strict=True):
            if isinstance(bank, (BlobMissing, InvalidTensor)):
                await self._refuse(job, ref, bank)
                continue
            banks.append(bank)
            weights.append(ref.num_examples)
            refs.append(ref)
        if len(refs) < job.min_updates or not refs:
            raise AggregationFailed(f"{len(refs)} of {len(job.updates)} banks are valid; "
                                    f"the job needs at least {job.min_updates}")
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


def use_cores(cores: int) -> None:
    """A worker thread's Numba thread count (Numba keeps it per calling thread)."""
    from federated_learning.aggregation import configure_threads

    configure_threads(cores)


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
    WeightedSum(base).add(updates, [1.0] * len(updates))
    warm_up_update_kernels()
    warm_up_memory_banks()
    log.info("aggregation kernels ready in %.2fs", time.perf_counter() - started)


def warm_up_update_kernels() -> None:
    """Compile (or load) the kernels that expand quantized updates and measure update norms."""
    from federated_learning.aggregation.inputs import squared_distance, squared_norm
    from federated_learning.privacy.compression import decompress_onto, quantize

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        values = np.ones(8, dtype)
        squared_norm(values)
        squared_distance(values, values)
    for bits in (8, 4):
        decompress_onto(quantize([np.ones(8, np.float32)], bits, rng), [np.zeros(8, np.float32)])


def warm_up_memory_banks() -> None:
    """Compile (or load) the k-center kernels, the parallel rescan included, so that a
    training's first bank merge does not pay the compile time (seconds) inside its round."""
    from federated_learning.memory_bank import merge_banks
    from federated_learning.memory_bank.kcenter import PARALLEL_MIN_ROWS

    rng = np.random.default_rng(0)
    banks = [rng.standard_normal((PARALLEL_MIN_ROWS // 2 + 1, 4)).astype(np.float32) for _ in range(2)]
    for weighted in (True, False):
        merge_banks(banks, [1, 2], 8, weighted=weighted)


def prepare_process(settings: Settings, _instance: str) -> None:
    """Memory, Numba's cache and threads set up, and the kernels compiled, before the bus."""
    retain_freed_memory()
    configure_numba(settings.cpu_cores, settings.data_dir)
    from federated_learning.aggregation import configure_threads

    configure_threads(settings.cpu_cores)
    warm_up()


def main() -> None:
    service_main("aggregator", "federated learning aggregator worker", lambda ctx: Aggregator(ctx).run,
                 prepare=prepare_process, per_instance_log=True)


if __name__ == "__main__":
    main()
