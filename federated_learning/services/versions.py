"""Version manager: commits released models as numbered checkpoints and announces them.

Idempotent per (training, round): the version number of a round is recorded in the
same transaction that records the version and announces it; a redelivered release
re-announces the recorded version. The commit itself is
:meth:`federated_learning.model_versions.ModelVersionManager.commit`, the path the
Python API's ``create_model_version`` takes too. Numbers are assigned as one more than the last
committed version, so a crash between the disk write and the record rewrites the
same file under the same number: no gaps, no duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Counter, Gauge

from federated_learning.bus.blobs import BlobMissing
from federated_learning.bus.consumer import run_consumers
from federated_learning.model_versions import ModelVersionManager
from federated_learning.protocol.keys import GROUP_VERSIONS
from federated_learning.protocol.messages import ModelReleased
from federated_learning.protocol.tensors import InvalidTensor
from federated_learning.records.trainings import TrainingViews
from federated_learning.records.versions import VersionIndex
from federated_learning.services.runtime import (
    ServiceContext,
    per_training,
    service_main,
)
from federated_learning.versioning.retention import versions_to_delete

log = logging.getLogger(__name__)

COMMITS = Counter("fl_versions_committed_total", "Versions committed")
LATEST = per_training(Gauge("fl_version_latest", "Latest committed version", ["training"]))


class VersionManager:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.index = VersionIndex(ctx.redis, ctx.keys)
        self.trainings = TrainingViews(ctx.redis, ctx.keys)
        self.api = ModelVersionManager(ctx)
        self.checkpoints = self.api.checkpoints
        self.consumers = ctx.cell_consumers(GROUP_VERSIONS, lambda cell: cell.release_stream, self.on_release)
        self.consumer = self.consumers[0]

    async def run(self, *, burst: bool = False) -> None:
        await run_consumers(self.consumers, self.ctx.stop, burst=burst)

    async def on_release(self, _id: bytes, fields: dict[bytes, bytes]) -> None:
        release = await self.ctx.decoded(ModelReleased, fields, "releases")
        if release is None:
            return
        try:
            commit = await self.api.commit(release)
        except (BlobMissing, InvalidTensor) as exc:
            await self.ctx.reject("releases", getattr(exc, "reason", "blob_missing"), str(exc),
                                  training_id=release.training_id, round=release.round)
            return
        if not commit.created:
            return
        COMMITS.inc()
        LATEST.labels(release.training_id).set(commit.record.version)
        await self.prune(release.training_id, protected={commit.record.version})

    async def prune(self, training_id: str, protected: set[int]) -> None:
        """Apply the retention policy: keep the best and the last N checkpoints, the current one,
        version 0 and pending rollback targets; delete the other checkpoint files."""
        keep_last = self.ctx.settings.checkpoint_keep_last
        if keep_last == 0:
            return
        state = await self.trainings.get(training_id)
        if state is not None:
            protected |= {v for v in (state.current_version, state.pending_rollback) if v is not None}
            if state.is_buffered and state.current_version is not None:
                # Stale asynchronous updates are re-based onto the version they started from.
                protected |= set(range(max(0, state.current_version - state.config.max_staleness),
                                       state.current_version + 1))
        scores = {m.eval_of_version: m.eval_accuracy for m in await self.trainings.metrics(training_id)
                  if m.eval_of_version is not None and m.eval_accuracy is not None}
        history = [r for r in await self.index.history(training_id) if r.pruned_at is None]
        doomed = versions_to_delete([r.version for r in history], scores, keep_last,
                                    self.ctx.settings.checkpoint_keep_best, protected)
        for record in history:
            if record.version not in doomed:
                continue
            await asyncio.to_thread(self.checkpoints.delete, training_id, record.version)
            # The bus blob before the record (another hash slot on a cluster): a crash in between
            # leaves a record this pass deletes again, never a blob no record names.
            if record.model_digest != (state.current_digest if state else None):
                await self.ctx.blobs.discard([(record.model_digest, None)])
            pruned = record.model_copy(update={"pruned_at": time.time()})
            async with self.ctx.redis.pipeline(transaction=True) as pipe:
                self.index.stage_commit(pipe, pruned)
                await pipe.execute()
        if doomed:
            await self.ctx.emit("checkpoints_pruned", f"deleted checkpoints of versions {doomed}",
                                training_id=training_id, versions=doomed)


def main() -> None:
    service_main("versions", "federated learning version manager", lambda ctx: VersionManager(ctx).run)


if __name__ == "__main__":
    main()
