"""Privacy manager: validates each aggregate, applies central DP, charges the budget, releases.

A release is recorded (``release`` hash, keyed by round) in the same transaction that
charges the accountant and announces it, so a redelivered aggregate re-announces
the recorded release instead of charging the budget twice. A refused model is never
written anywhere: the training is stopped with the reason. Once a noised model is released,
the un-noised aggregate is deleted from the bus, unless the same bytes are one of the
training's committed versions.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge
from redis.exceptions import WatchError

from federated_learning.bus.consumer import run_consumers
from federated_learning.bus.replies import text
from federated_learning.privacy.release import ReleaseRefused, plan_release
from federated_learning.protocol.banks import decode_bank_version
from federated_learning.protocol.keys import GROUP_PRIVACY
from federated_learning.protocol.messages import (
    AggregateReady,
    MemoryBankModel,
    ModelReleased,
    Severity,
    StopTraining,
    VersionRecord,
    encode,
)
from federated_learning.protocol.tensors import (
    InvalidTensor,
    decode_layers,
    encode_layers,
    validate_layers,
)
from federated_learning.records.trainings import TrainingViews
from federated_learning.services.runtime import (
    ServiceContext,
    per_training,
    service_main,
)

log = logging.getLogger(__name__)

RELEASES = Counter("fl_privacy_releases_total", "Models released", ["level"])
REFUSALS = Counter("fl_privacy_refusals_total", "Releases refused", ["reason"])
EPSILON = per_training(Gauge("fl_privacy_epsilon_spent", "Epsilon spent", ["training"]))


class PrivacyManager:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.trainings = TrainingViews(ctx.redis, ctx.keys)
        self.consumers = ctx.cell_consumers(GROUP_PRIVACY, lambda cell: cell.aggregate_stream, self.on_aggregate)
        self.consumer = self.consumers[0]

    async def run(self, *, burst: bool = False) -> None:
        await run_consumers(self.consumers, self.ctx.stop, burst=burst)

    async def on_aggregate(self, _id: bytes, fields: dict[bytes, bytes]) -> None:
        ready = await self.ctx.decoded(AggregateReady, fields, "aggregates")
        if ready is None:
            return
        keys = self.ctx.keys.for_training(ready.training_id)  # its transaction writes the training's cell
        recorded = await self.ctx.redis.hget(keys.release(ready.training_id), str(ready.round))
        if recorded is not None:
            await self.ctx.redis.xadd(keys.release_stream, {b"m": recorded})
            await self.discard_unnoised(ready, ModelReleased.model_validate_json(recorded).model_digest)
            return
        state = await self.trainings.get(ready.training_id)
        if state is None or state.status.is_final:
            await self.ctx.reject("aggregates", "unknown_training", ready.training_id,
                                  training_id=ready.training_id, round=ready.round)
            return
        try:
            data = await self.ctx.blobs.get(ready.model_digest)
            layers = decode_layers(data, max_bytes=self.ctx.settings.max_blob_bytes)
            if isinstance(state.config.model, MemoryBankModel):  # a bank's rows grow up to its size
                decode_bank_version(data, state.config.model, max_bytes=self.ctx.settings.max_blob_bytes)
            else:
                validate_layers(layers, state.layer_spec)
        except InvalidTensor as exc:
            await self.ctx.reject("aggregates", exc.reason, exc.detail,
                                  training_id=ready.training_id, round=ready.round)
            return
        budget_raw = await self.ctx.redis.get(keys.privacy_budget(ready.training_id))
        try:
            plan = plan_release(state, layers, ready, text(budget_raw) if budget_raw else None)
        except ReleaseRefused as exc:
            await self.refuse(ready, str(exc))
            return
        digest = ready.model_digest
        if plan.noised_layers is not None:
            digest = await self.ctx.blobs.put(encode_layers(plan.noised_layers))
        release = ModelReleased(
            training_id=ready.training_id, round=ready.round, parent_version=ready.base_version,
            model_digest=digest, state_digest=ready.state_digest, contributors=ready.contributors,
            num_examples=ready.num_examples, algorithm=state.config.algorithm, privacy=plan.report,
            unclipped_count=ready.unclipped_count, update_norm_mean=ready.update_norm_mean,
            contributions=ready.contributions,
        )
        payload = release.model_dump_json()
        async with self.ctx.redis.pipeline(transaction=True) as pipe:
            if plan.budget_json is not None:
                pipe.set(keys.privacy_budget(ready.training_id), plan.budget_json)
            pipe.hset(keys.release(ready.training_id), str(ready.round), payload)
            pipe.xadd(keys.release_stream, encode(release))
            await pipe.execute()
        await self.discard_unnoised(ready, digest)
        RELEASES.labels(plan.report.level).inc()
        EPSILON.labels(ready.training_id).set(plan.report.epsilon_spent)
        await self.ctx.emit("model_released", plan.report.note or f"released under '{plan.report.level}'",
                            training_id=ready.training_id, round=ready.round,
                            **plan.report.model_dump())
        for alert in plan.alerts:
            await self.ctx.emit("privacy_budget", alert, severity=Severity.WARNING,
                                training_id=ready.training_id, round=ready.round)

    async def discard_unnoised(self, ready: AggregateReady, released_digest: str) -> None:
        """Delete the aggregate's un-noised model once ``released_digest`` (its noised version) is
        released. Kept when nothing was noised, or when the same bytes are a committed version's
        model or state of the training: the check and the delete are one transaction against a
        version committed meanwhile (WATCH on the version index); on a cluster, where the blob
        lives in another hash slot, the delete follows that transaction at once."""
        if ready.model_digest == released_digest:
            return
        versions = self.ctx.keys.versions(ready.training_id)
        async with self.ctx.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(versions)
                    records = [VersionRecord.model_validate_json(raw) for raw in await pipe.hvals(versions)]
                    if any(ready.model_digest in (record.model_digest, record.state_digest) for record in records):
                        log.warning("training %s round %d: the un-noised aggregate %s is also a committed "
                                    "version's blob; kept", ready.training_id, ready.round, ready.model_digest)
                        return
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if self.ctx.keys.cluster or not self.ctx.blobs.in_redis:
                        # The blob is a file, or its key in another hash slot: EXEC of nothing fails
                        # if a version was committed since the WATCH, and the blob goes right after.
                        await pipe.execute()
                        await self.ctx.blobs.discard([(ready.model_digest, None)])
                    else:
                        pipe.unlink(self.ctx.keys.blob(ready.model_digest))
                        await pipe.execute()
                    return
                except WatchError:
                    continue

    async def refuse(self, ready: AggregateReady, reason: str) -> None:
        REFUSALS.labels("budget").inc()
        stop = StopTraining(training_id=ready.training_id, reason=reason, failed=True)
        await self.ctx.redis.xadd(self.ctx.keys.control_stream, encode(stop))
        await self.ctx.emit("release_refused", reason, severity=Severity.CRITICAL,
                            training_id=ready.training_id, round=ready.round)


def main() -> None:
    service_main("privacy", "federated learning privacy manager", lambda ctx: PrivacyManager(ctx).run)


if __name__ == "__main__":
    main()
