"""The version manager's Python API: create, read, compare and roll back model versions.

One object over a deployment's Redis and checkpoint folder, with the method names of the
original design (``create_model_version``, ``get_model_version``, ``rollback_to_version``,
``compare_versions``) plus ``history`` and ``lineage``. The version manager service commits
every released model through :meth:`ModelVersionManager.create_model_version`, and the
dashboard's REST routes serve versions, comparisons and rollbacks through it, so a script
that uses this API takes the same paths as the running system:

    client = redis.asyncio.Redis.from_url(deployment_redis_url)
    versions = ModelVersionManager.for_redis(client, settings)
    model = await versions.get_model_version(3, "my-training")
    diff = await versions.compare_versions("my-training", 1, 3)
    await versions.rollback_to_version("my-training", 1)
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from federated_learning.bus.blobs import BlobMissing
from federated_learning.config import Settings
from federated_learning.protocol.messages import (
    ModelReleased,
    RollbackTraining,
    Severity,
    VersionCommitted,
    VersionRecord,
    encode,
)
from federated_learning.protocol.tensors import InvalidTensor, decode_layers, digest_of
from federated_learning.records.checkpoints import CheckpointStore
from federated_learning.records.trainings import TrainingViews
from federated_learning.records.versions import VersionIndex
from federated_learning.services.runtime import ServiceContext
from federated_learning.types import NamedLayers
from federated_learning.versioning.compare import VersionComparison, compare_versions

API_SOURCE = "version-api"
"""The event source of an API built by :meth:`ModelVersionManager.for_redis`."""

class UnknownTraining(LookupError):
    """No training with this id."""

    def __init__(self, training_id: str) -> None:
        super().__init__(f"no training '{training_id}'")
        self.training_id = training_id


class UnknownVersion(LookupError):
    """The training has no committed version with this number."""

    def __init__(self, training_id: str, version: int) -> None:
        super().__init__(f"no version {version} of '{training_id}'")
        self.training_id = training_id
        self.version = version


class VersionUnavailable(LookupError):
    """The version is recorded but its model cannot be served (pruned, missing or corrupt)."""

    def __init__(self, training_id: str, version: int, detail: str) -> None:
        super().__init__(detail)
        self.training_id = training_id
        self.version = version
        self.detail = detail


@dataclass(frozen=True)
class ModelVersion:
    """A committed version's record and its model as safetensors bytes (hash-checked)."""

    record: VersionRecord
    data: bytes

    def layers(self, max_bytes: int) -> NamedLayers:
        """The model's named arrays, decoded with the same limits as any blob."""
        return decode_layers(self.data, max_bytes=max_bytes)


@dataclass(frozen=True)
class Commit:
    """What :meth:`ModelVersionManager.commit` did: the record, and whether it is new
    (False when the round had already been committed and was only re-announced)."""

    record: VersionRecord
    created: bool


class ModelVersionManager:
    """Versions of the trainings in one deployment, read and written through its Redis."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.index = VersionIndex(ctx.redis, ctx.keys)
        self.trainings = TrainingViews(ctx.redis, ctx.keys)
        self.checkpoints = CheckpointStore(ctx.settings.data_dir / "checkpoints")

    @classmethod
    def for_redis(cls, redis: aioredis.Redis, settings: Settings, *,
                  source: str = API_SOURCE) -> ModelVersionManager:
        """An API on an open client; ``settings.data_dir`` must be the deployment's data folder."""
        return cls(ServiceContext(redis=redis, settings=settings, service=source, instance="0"))

    async def create_model_version(self, training_id: str, aggregation_result: ModelReleased,
                                   model: bytes | None = None) -> int:
        """Commit a released model as the training's next version and announce it; return its number.

        ``model`` (safetensors bytes) is stored in the blob store first when given; otherwise the
        blob named by ``aggregation_result.model_digest`` must be there, as for the service.
        Idempotent per (training, round). Raises ``BlobMissing`` or ``InvalidTensor``.
        """
        if aggregation_result.training_id != training_id:
            raise ValueError(f"release is for training '{aggregation_result.training_id}', not '{training_id}'")
        if model is not None:
            if digest_of(model) != aggregation_result.model_digest:
                raise InvalidTensor("hash_mismatch", "model bytes do not match the release's model_digest")
            await self.ctx.blobs.put(model)
        return (await self.commit(aggregation_result)).record.version

    async def commit(self, release: ModelReleased) -> Commit:
        """Write the checkpoint atomically, then record and announce the version in one transaction."""
        existing = await self._committed_round(release)
        if existing is not None:
            await self.ctx.redis.xadd(self.ctx.keys.for_training(release.training_id).version_stream,
                                      encode(_announcement(existing)))
            return Commit(existing, created=False)
        data = await self.ctx.blobs.get(release.model_digest)
        decode_layers(data, max_bytes=self.ctx.settings.max_blob_bytes)
        record = self._record(release, await self.index.next_version(release.training_id))
        await asyncio.to_thread(self.checkpoints.write, release.training_id, record.version, data,
                                record.model_dump_json(indent=1))
        async with self.ctx.redis.pipeline(transaction=True) as pipe:
            self.index.stage_commit(pipe, record)
            pipe.xadd(self.ctx.keys.for_training(record.training_id).version_stream, encode(_announcement(record)))
            await pipe.execute()
        await self.ctx.emit("version_committed", f"version {record.version} from round {release.round}",
                            training_id=release.training_id, round=release.round, version=record.version,
                            parent_version=release.parent_version, digest=release.model_digest)
        return Commit(record, created=True)

    async def get_model_version(self, version_id: int, training_id: str) -> ModelVersion:
        """The version's model from the bus, else from its checkpoint, checked against its committed hash.

        Raises :class:`UnknownVersion`, or :class:`VersionUnavailable` when the checkpoint was
        pruned, is missing or fails its hash (a corrupt copy is reported, never returned).
        """
        record = await self._record_of(training_id, version_id)
        try:
            return ModelVersion(record, await self.ctx.blobs.get(record.model_digest))
        except (BlobMissing, InvalidTensor):
            pass
        if record.pruned_at is not None:
            raise VersionUnavailable(training_id, version_id,
                                     f"version {version_id}'s checkpoint was deleted by the retention policy")
        return ModelVersion(record, await self._read_checkpoint(record))

    async def rollback_to_version(self, training_id: str, target_version: int,
                                  reason: str = "rolled back by operator") -> int:
        """Ask the coordinator to continue the training from ``target_version``; return that version.

        The operator path: a ``RollbackTraining`` command on the control stream, applied for the
        next round (a collecting round restarts from the target). Raises :class:`UnknownTraining`
        or :class:`UnknownVersion` and sends nothing then.
        """
        await self._require_training(training_id)
        await self._record_of(training_id, target_version)
        command = RollbackTraining(training_id=training_id, version=target_version, reason=reason)
        await self.ctx.redis.xadd(self.ctx.keys.control_stream, encode(command))
        return target_version

    async def compare_versions(self, training_id: str, version1: int, version2: int) -> VersionComparison:
        """Per-layer and overall L2 distance and cosine of two versions, and their metric deltas (2 - 1)."""
        metrics = await self._version_metrics(training_id)
        a = (await self.get_model_version(version1, training_id)).layers(self.ctx.settings.max_blob_bytes)
        b = (await self.get_model_version(version2, training_id)).layers(self.ctx.settings.max_blob_bytes)
        return compare_versions(a, b, metrics.get(version1), metrics.get(version2))

    async def history(self, training_id: str) -> list[VersionRecord]:
        """Every committed version of the training, in version order (empty for none)."""
        return await self.index.history(training_id)

    async def lineage(self, training_id: str, version: int) -> list[VersionRecord]:
        """``version`` and its ancestors by parent link, newest first, ending at a version without parent.

        After a rollback the chain skips the versions that were rolled back over. Each record's
        ``metrics`` holds the version's federated accuracy and loss when it has been evaluated
        (a version is evaluated by the round after it, or by the final evaluation), else None.
        """
        records = {r.version: r for r in await self.index.history(training_id)}
        if version not in records:
            raise UnknownVersion(training_id, version)
        chain = [records[version]]
        while (parent := chain[-1].parent_version) is not None and parent in records:
            if parent >= chain[-1].version:  # parents are always older; anything else would loop
                raise ValueError(f"version lineage of '{training_id}' does not descend at version {parent}")
            chain.append(records[parent])
        try:
            metrics = await self._version_metrics(training_id)
        except UnknownTraining:
            metrics = {}
        return [r.model_copy(update={"metrics": metrics.get(r.version) or None}) for r in chain]

    async def _committed_round(self, release: ModelReleased) -> VersionRecord | None:
        existing = await self.index.version_of_round(release.training_id, release.round)
        return None if existing is None else await self.index.get(release.training_id, existing)

    def _record(self, release: ModelReleased, version: int) -> VersionRecord:
        return VersionRecord(
            training_id=release.training_id, version=version, round=release.round,
            parent_version=release.parent_version, model_digest=release.model_digest,
            state_digest=release.state_digest,
            checkpoint=str(self.checkpoints.model_path(release.training_id, version)),
            algorithm=release.algorithm, contributors=release.contributors,
            num_examples=release.num_examples, privacy=release.privacy, created_at=time.time(),
        )

    async def _require_training(self, training_id: str) -> None:
        if await self.trainings.get(training_id) is None:
            raise UnknownTraining(training_id)

    async def _record_of(self, training_id: str, version: int) -> VersionRecord:
        record = await self.index.get(training_id, version)
        if record is None:
            raise UnknownVersion(training_id, version)
        return record

    async def _read_checkpoint(self, record: VersionRecord) -> bytes:
        training_id, version = record.training_id, record.version
        try:
            return await asyncio.to_thread(self.checkpoints.read, training_id, version, record.model_digest)
        except InvalidTensor as exc:
            await self.ctx.emit("checkpoint_corrupt", exc.detail, severity=Severity.CRITICAL,
                                training_id=training_id, version=version)
            raise VersionUnavailable(training_id, version, f"version {version} unavailable: {exc.detail}") from exc
        except OSError as exc:
            raise VersionUnavailable(training_id, version, f"version {version} unavailable: {exc}") from exc

    async def _version_metrics(self, training_id: str) -> dict[int, dict[str, float]]:
        """Federated accuracy and loss per evaluated version (the final evaluation for the last one)."""
        state = await self.trainings.get(training_id)
        if state is None:
            raise UnknownTraining(training_id)
        metrics = {m.eval_of_version: {"accuracy": m.eval_accuracy, "loss": m.eval_loss}
                   for m in await self.trainings.metrics(training_id) if m.eval_of_version is not None}
        if state.final_evaluation is not None and state.current_version is not None:
            metrics[state.current_version] = {"accuracy": state.final_evaluation.accuracy,
                                              "loss": state.final_evaluation.loss}
        return {v: {k: x for k, x in row.items() if x is not None} for v, row in metrics.items()}


def _announcement(record: VersionRecord) -> VersionCommitted:
    return VersionCommitted(training_id=record.training_id, version=record.version, round=record.round,
                            parent_version=record.parent_version, model_digest=record.model_digest,
                            state_digest=record.state_digest)
