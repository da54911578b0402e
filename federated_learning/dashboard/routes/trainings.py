"""Trainings: start, list, status, stop, metrics, versions, model download."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, Response, status
from pydantic import BaseModel, ConfigDict, Field

from federated_learning.bus.blobs import BlobMissing
from federated_learning.coordination.state import TrainingState
from federated_learning.dashboard.auth import ApiKey
from federated_learning.dashboard.deps import Blobs, Context, Trainings, Versions
from federated_learning.privacy.accountant import PrivacyAccountant
from federated_learning.privacy.levels import PrivacyLevel, privacy_targets
from federated_learning.protocol.messages import (
    Identifier,
    RollbackTraining,
    RoundMetrics,
    Severity,
    StartTraining,
    StopTraining,
    TrainingConfig,
    VersionRecord,
    encode,
)
from federated_learning.protocol.tensors import InvalidTensor, decode_layers
from federated_learning.records.checkpoints import CheckpointStore
from federated_learning.types import NamedLayers
from federated_learning.versioning.compare import compare_versions

router = APIRouter(prefix="/api", tags=["trainings"])


class StartRequest(TrainingConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)
    training_id: Identifier | None = None


class StartResponse(BaseModel):
    training_id: str
    status: str = "accepted"


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="stopped by operator", max_length=500)


def _public(state: TrainingState) -> dict[str, Any]:
    return state.model_dump(mode="json", exclude={"layer_spec"})


async def _state(trainings: Trainings, training_id: str) -> TrainingState:
    state = await trainings.load(training_id)
    if state is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no training '{training_id}'")
    return state


@router.post("/training/start", status_code=status.HTTP_202_ACCEPTED, response_model=StartResponse)
async def start_training(body: StartRequest, ctx: Context, trainings: Trainings, _auth: ApiKey) -> StartResponse:
    training_id = body.training_id or uuid.uuid4().hex[:12]
    if body.training_id and await trainings.load(training_id) is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"training '{training_id}' exists")
    config = TrainingConfig.model_validate(body.model_dump(exclude={"training_id"}))
    command = StartTraining(training_id=training_id, config=config)
    await ctx.redis.xadd(ctx.keys.control_stream, encode(command))  # type: ignore[arg-type]
    return StartResponse(training_id=training_id)


@router.get("/trainings")
async def list_trainings(trainings: Trainings) -> list[dict[str, Any]]:
    states = [await trainings.load(tid) for tid in await trainings.list_ids()]
    return [_public(s) for s in states if s is not None]


@router.get("/training/{training_id}/status")
async def training_status(training_id: str, trainings: Trainings) -> dict[str, Any]:
    return _public(await _state(trainings, training_id))


@router.post("/training/{training_id}/stop", status_code=status.HTTP_202_ACCEPTED)
async def stop_training(training_id: str, ctx: Context, trainings: Trainings, _auth: ApiKey,
                        body: StopRequest | None = None) -> dict[str, str]:
    await _state(trainings, training_id)
    command = StopTraining(training_id=training_id, reason=(body or StopRequest()).reason)
    await ctx.redis.xadd(ctx.keys.control_stream, encode(command))  # type: ignore[arg-type]
    return {"training_id": training_id, "status": "stopping"}


@router.get("/training/{training_id}/metrics", response_model=list[RoundMetrics])
async def training_metrics(training_id: str, trainings: Trainings) -> list[RoundMetrics]:
    await _state(trainings, training_id)
    return await trainings.metrics(training_id)


@router.get("/training/{training_id}/versions", response_model=list[VersionRecord])
async def training_versions(training_id: str, trainings: Trainings, versions: Versions) -> list[VersionRecord]:
    await _state(trainings, training_id)
    return await versions.history(training_id)


@router.get("/training/{training_id}/versions/{version}/model",
            response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
async def download_model(training_id: str, version: int, ctx: Context, versions: Versions,
                         blobs: Blobs) -> Response:
    """The version's weights as a safetensors file (from the bus, else from its checkpoint)."""
    record, data = await _model_bytes(versions, blobs, ctx, training_id, version)
    return Response(content=data, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{training_id}-v{version}.safetensors"',
        "X-Model-SHA256": record.model_digest,
    })


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=0)
    reason: str = Field(default="rolled back by operator", max_length=500)


@router.post("/training/{training_id}/rollback", status_code=status.HTTP_202_ACCEPTED)
async def rollback_training(training_id: str, body: RollbackRequest, ctx: Context, trainings: Trainings,
                            versions: Versions, _auth: ApiKey) -> dict[str, Any]:
    """Continue the training from an earlier version (takes effect for the next round)."""
    await _state(trainings, training_id)
    if await versions.get(training_id, body.version) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no version {body.version} of '{training_id}'")
    command = RollbackTraining(training_id=training_id, version=body.version, reason=body.reason)
    await ctx.redis.xadd(ctx.keys.control_stream, encode(command))  # type: ignore[arg-type]
    return {"training_id": training_id, "rollback_to": body.version, "status": "requested"}


async def _model_bytes(versions: Versions, blobs: Blobs, ctx: Context, training_id: str,
                       version: int) -> tuple[VersionRecord, bytes]:
    """A version's model bytes, checked against its committed hash; a corrupt copy is reported, never served."""
    record = await versions.get(training_id, version)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no version {version} of '{training_id}'")
    try:
        return record, await blobs.get(record.model_digest)
    except (BlobMissing, InvalidTensor):
        pass
    if record.pruned_at is not None:
        raise HTTPException(status.HTTP_410_GONE,
                            detail=f"version {version}'s checkpoint was deleted by the retention policy")
    try:
        data = await asyncio.to_thread(CheckpointStore(ctx.settings.data_dir / "checkpoints").read,
                                       training_id, version, record.model_digest)
    except InvalidTensor as exc:
        await ctx.emit("checkpoint_corrupt", exc.detail, severity=Severity.CRITICAL,
                       training_id=training_id, version=version)
        raise HTTPException(status.HTTP_410_GONE, detail=f"version {version} unavailable: {exc.detail}") from exc
    except OSError as exc:
        raise HTTPException(status.HTTP_410_GONE, detail=f"version {version} unavailable: {exc}") from exc
    return record, data


async def _layers(versions: Versions, blobs: Blobs, ctx: Context, training_id: str, version: int) -> NamedLayers:
    _record, data = await _model_bytes(versions, blobs, ctx, training_id, version)
    return decode_layers(data, max_bytes=ctx.settings.max_blob_bytes)


@router.get("/training/{training_id}/versions/compare")
async def compare(training_id: str, a: int, b: int, ctx: Context, trainings: Trainings,
                  versions: Versions, blobs: Blobs) -> dict[str, Any]:
    """Per-layer L2 distance and cosine similarity of two versions, and their metric deltas."""
    state = await _state(trainings, training_id)
    metrics = {m.eval_of_version: {"accuracy": m.eval_accuracy, "loss": m.eval_loss}
               for m in await trainings.metrics(training_id) if m.eval_of_version is not None}
    if state.final_evaluation is not None and state.current_version is not None:
        metrics[state.current_version] = {"accuracy": state.final_evaluation.accuracy,
                                          "loss": state.final_evaluation.loss}
    clean = {v: {k: x for k, x in row.items() if x is not None} for v, row in metrics.items()}
    result = compare_versions(await _layers(versions, blobs, ctx, training_id, a),
                              await _layers(versions, blobs, ctx, training_id, b),
                              clean.get(a), clean.get(b))
    return {"training_id": training_id, "a": a, "b": b, **result.to_dict()}


@router.get("/training/{training_id}/privacy")
async def privacy_budget(training_id: str, ctx: Context, trainings: Trainings) -> dict[str, Any]:
    """The training's privacy level, its (epsilon, delta) target, epsilon spent per round and what is left."""
    state = await _state(trainings, training_id)
    targets = privacy_targets(PrivacyLevel(state.privacy_level))
    per_round = [{"round": m.round, "version": m.version, "epsilon_spent": m.epsilon_spent}
                 for m in await trainings.metrics(training_id)]
    if not targets.enabled:
        return {"training_id": training_id, "level": "none", "mode": state.config.privacy_mode,
                "epsilon_target": None, "delta": None, "epsilon_spent": 0.0, "remaining": None,
                "per_round": per_round}
    raw = await ctx.redis.get(ctx.keys.privacy_budget(training_id))
    spent = PrivacyAccountant.from_dict(json.loads(raw)).get_epsilon() if raw else 0.0
    return {"training_id": training_id, "level": state.privacy_level, "mode": state.config.privacy_mode,
            "epsilon_target": targets.epsilon, "delta": targets.delta, "epsilon_spent": spent,
            "remaining": max(0.0, targets.epsilon - spent), "per_round": per_round}
