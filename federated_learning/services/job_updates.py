"""A job's updates, for the aggregator: each read and checked once (kept by the read-ahead, else
fetched), decoded on the worker's threads, each invalid one refused; then all of them, or their
example-weighted sum folded a group at a time (decision 0017)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.typing import NDArray

from federated_learning.aggregation.inputs import PreparedUpdate, UpdateLayout, prepare_update
from federated_learning.aggregation.streaming import WeightedSum
from federated_learning.bus.blobs import BlobMissing, BlobStore
from federated_learning.protocol.messages import AggregationJob, UpdateRef
from federated_learning.protocol.tensors import InvalidTensor, decode_layers
from federated_learning.services.update_cache import UpdateCache
from federated_learning.types import BlobDigest, NamedLayers


class AggregationFailed(RuntimeError):
    """A job that cannot produce a model (too few valid updates, or the rule refused)."""


Upload = bytes | BlobMissing | InvalidTensor
"""An update's bytes, checked against its digest, or why it could not be read."""
Prepared = PreparedUpdate | BlobMissing | InvalidTensor
"""An update decoded and laid out for the rule, or why it could not be."""
Refuse = Callable[[AggregationJob, UpdateRef, BlobMissing | InvalidTensor], Awaitable[None]]
"""Report an invalid update of a job to the coordinator."""
FOLDED_GROUP = 8
"""Updates decoded at once (and folded together) when a job takes only their weighted mean."""


class JobUpdates:
    """Loads the updates of the jobs one aggregator worker runs."""

    def __init__(self, blobs: BlobStore, cache: UpdateCache, pool: Callable[[], ThreadPoolExecutor],
                 refuse: Refuse, *, max_blob_bytes: int) -> None:
        self.blobs = blobs
        self.cache = cache
        self.pool = pool
        self.refuse = refuse
        self.max_blob_bytes = max_blob_bytes

    async def _own_bases(self, job: AggregationJob) -> dict[BlobDigest, NamedLayers | BlobMissing | InvalidTensor]:
        """The models that updates of an asynchronous training were trained from, by digest."""
        bases: dict[BlobDigest, NamedLayers | BlobMissing | InvalidTensor] = {}
        for digest in dict.fromkeys(ref.model_digest for ref in job.updates if ref.model_digest is not None):
            try:
                bases[digest] = decode_layers(await self.blobs.get(digest),
                                              max_bytes=self.max_blob_bytes)
            except (BlobMissing, InvalidTensor) as exc:
                bases[digest] = exc
        return bases

    async def _checked_uploads(self, job: AggregationJob) -> tuple[list[Upload | None], set[int], set[int]]:
        """Each update's bytes the read-ahead kept, checked against its digest, or why it is
        invalid; None for one it did not read (after a restart or a takeover), which is fetched
        when its turn to be decoded comes. Also the positions whose problem the read-ahead reported,
        and those whose bytes it checked whole (``check_update``)."""
        self.cache.job_started(job.training_id, job.round)
        kept = [self.cache.get((ref.digest, ref.agent_id)) for ref in job.updates]
        uploads: list[Upload | None] = [await verdict if verdict is not None else None for verdict in kept]
        reported = {k for k, upload in enumerate(uploads) if isinstance(upload, (BlobMissing, InvalidTensor))}
        checked = {k for k, upload in enumerate(uploads) if isinstance(upload, bytes)}
        return uploads, reported, checked

    async def _preparer(self, job: AggregationJob, layout: UpdateLayout, uploads: list[Upload | None],
                        checked: set[int]) -> Callable[[Sequence[int]], asyncio.Future[list[Prepared]]]:
        """Decode, check and lay out the job's updates at the given positions on the pool
        (``prepare_update``); the values of those in ``checked`` were checked by the read-ahead.
        Those it did not read are fetched together, each checked and decoded on the pool as it
        arrives, so that fetching overlaps decoding, and a folded job holds the bytes of its two
        groups only. The pool's work for held updates is submitted before the call returns, so
        that it runs while the caller's thread folds the previous group."""
        own_bases = await self._own_bases(job)
        loop = asyncio.get_running_loop()

        def prepare(k: int, data: bytes) -> PreparedUpdate:
            own = own_bases.get(job.updates[k].model_digest or "")
            if isinstance(own, (BlobMissing, InvalidTensor)):
                raise own
            return prepare_update(data, layout, own, values_checked=k in checked)

        def prepare_held(k: int, data: bytes) -> Prepared:
            try:
                return prepare(k, data)
            except (BlobMissing, InvalidTensor) as exc:
                return exc

        def held(k: int, upload: Upload) -> asyncio.Future[Prepared]:
            if isinstance(upload, (BlobMissing, InvalidTensor)):
                done: asyncio.Future[Prepared] = loop.create_future()
                done.set_result(upload)
                return done
            return loop.run_in_executor(self.pool(), prepare_held, k, upload)

        async def fetched(positions: list[int]) -> list[Prepared]:
            if not positions:
                return []
            return await self.blobs.get_each(
                [(job.updates[k].digest, job.updates[k].agent_id) for k in positions],
                lambda i, data: prepare(positions[i], data), executor=self.pool())

        def prepared(positions: Sequence[int]) -> asyncio.Future[list[Prepared]]:
            missing = [k for k in positions if uploads[k] is None]
            present = [(k, held(k, upload)) for k in positions if (upload := uploads[k]) is not None]
            together = asyncio.gather(fetched(missing), asyncio.gather(*(result for _, result in present)))

            async def in_order() -> list[Prepared]:  # cancelled, it cancels the fetch and the decoding
                from_store, from_cache = await together
                results = dict(zip(missing, from_store, strict=True)) | {
                    k: result for (k, _), result in zip(present, from_cache, strict=True)}
                return [results[k] for k in positions]

            return asyncio.ensure_future(in_order())

        return prepared

    async def load(self, job: AggregationJob,
                   layout: UpdateLayout) -> tuple[list[UpdateRef], list[PreparedUpdate]]:
        """Check and decode the job's updates concurrently; refuse each invalid one (agent and
        reason) and return the valid ones in job order. Fails the job when fewer than
        ``job.min_updates`` are valid."""
        uploads, reported, checked = await self._checked_uploads(job)
        prepared = await self._preparer(job, layout, uploads, checked)
        loaded = await prepared(range(len(uploads)))
        refs: list[UpdateRef] = []
        valid: list[PreparedUpdate] = []
        for k, (ref, result) in enumerate(zip(job.updates, loaded, strict=True)):
            if isinstance(result, (BlobMissing, InvalidTensor)):
                if k not in reported:
                    await self.refuse(job, ref, result)
                continue
            refs.append(ref)
            valid.append(result)
        self._check_enough(job, len(refs))
        return refs, valid

    async def fold(self, job: AggregationJob, layout: UpdateLayout
                   ) -> tuple[list[UpdateRef], WeightedSum, list[dict[str, NDArray[np.generic]]]]:
        """The job's valid updates folded into their example-weighted sum, FOLDED_GROUP at a time
        (decoded concurrently, then folded in job order), so that the expanded updates of two
        groups (the one folded, the next one decoded meanwhile) are all that exist at once; each
        invalid one refused. Also each valid update's carried integer layers. Fails the job when
        fewer than ``job.min_updates`` are valid."""
        uploads, reported, checked = await self._checked_uploads(job)
        prepared = await self._preparer(job, layout, uploads, checked)
        total = WeightedSum(layout.global_layers)
        refs: list[UpdateRef] = []
        carried: list[dict[str, NDArray[np.generic]]] = []
        groups = [range(first, min(len(uploads), first + FOLDED_GROUP))
                  for first in range(0, len(uploads), FOLDED_GROUP)]

        def decode(group: range) -> asyncio.Future[list[Prepared]]:
            return prepared(group)

        pending = decode(groups[0]) if groups else None
        try:
            for index, group in enumerate(groups):
                assert pending is not None
                loaded = await pending
                if index + 1 < len(groups):  # the pool decodes the next group while this one is folded
                    pending = decode(groups[index + 1])
                    await asyncio.sleep(0)
                rows: list[list[NDArray[np.floating]]] = []
                weights: list[float] = []
                for k, result in zip(group, loaded, strict=True):
                    ref = job.updates[k]
                    if isinstance(result, (BlobMissing, InvalidTensor)):
                        if k not in reported:
                            await self.refuse(job, ref, result)
                        continue
                    refs.append(ref)
                    carried.append(result.carried)
                    rows.append(result.rows)
                    weights.append(float(ref.num_examples))
                del loaded
                try:
                    total.add(rows, weights)  # on this thread, as the rules run: one parallel kernel at a time
                except ValueError as exc:
                    raise AggregationFailed(str(exc)) from exc
                del rows
        finally:
            if pending is not None:  # a failed job leaves no decoding behind, nor an unread failure
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
        self._check_enough(job, len(refs))
        return refs, total, carried

    @staticmethod
    def _check_enough(job: AggregationJob, valid: int) -> None:
        if valid < job.min_updates or not valid:
            raise AggregationFailed(f"{valid} of {len(job.updates)} updates are valid; "
                                    f"the job needs at least {job.min_updates}")
