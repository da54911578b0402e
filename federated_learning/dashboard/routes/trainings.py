"""Trainings: start, list, status, stop, metrics, versions, model download."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Response, status
from pydantic import BaseModel, ConfigDict, Field

from federated_learning.access import DEFAULT_ORG, DEFAULT_PROJECT, Principal, training_id_for
from federated_learning.dashboard.auth import (
    ApiKey,
    Viewer,
    confine_to_training_org,
    ensure_org,
    existing_project,
)
from federated_learning.dashboard.deps import AppSettings, Context, Orgs, Trainings, Versions
from federated_learning.dashboard.routes.models import model_record
from federated_learning.model_versions import (
    ModelVersionManager,
    UnknownTraining,
    UnknownVersion,
    VersionUnavailable,
)
from federated_learning.privacy.accountant import PrivacyAccountant
from federated_learning.privacy.levels import PrivacyLevel, privacy_targets
from federated_learning.protocol.messages import (
    Identifier,
    RoundMetrics,
    StartTraining,
    StopTraining,
    TrainingConfig,
    UploadedModel,
    VersionRecord,
    encode,
)
from federated_learning.protocol.tensors import decode_layers, is_float
from federated_learning.protocol.trainings import TrainingView
from federated_learning.records.model_refusals import ModelRefusals

router = APIRouter(prefix="/api", tags=["trainings"], dependencies=[Depends(confine_to_training_org)])
"""Every route needs a key that may read; a ``{training_id}`` must be of the key's organisation."""


class StartRequest(TrainingConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)
    training_id: Identifier | None = None
    project_id: Identifier | None = Field(default=None, description="a project of the key's organisation; "
                                                                      "default: the 'default' project")
    org_id: Identifier | None = Field(default=None, description="the bootstrap key only: the organisation")


class StartResponse(BaseModel):
    training_id: str
    status: str = "accepted"


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="stopped by operator", max_length=500)


def _public(state: TrainingView) -> dict[str, Any]:
    return state.model_dump(mode="json", exclude={"layer_spec"})


def _layout(state: TrainingView) -> list[dict[str, Any]]:
    """The training's model layout, once fixed: [{name, shape, dtype}]."""
    return [{"name": name, "shape": list(shape), "dtype": dtype} for name, (shape, dtype) in state.layer_spec.items()]


async def _state(trainings: Trainings, training_id: str) -> TrainingView:
    state = await trainings.get(training_id)
    if state is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no training '{training_id}'")
    return state


async def _owner(ctx: Context, orgs: Orgs, principal: Principal, body: StartRequest) -> tuple[str, str]:
    """The (organisation, project) a new training belongs to: the key's organisation, the named project."""
    org_id = body.org_id or principal.org_id or DEFAULT_ORG
    await ensure_org(ctx, principal, org_id)
    project_id = body.project_id or DEFAULT_PROJECT
    await existing_project(orgs, org_id, project_id)
    return org_id, project_id


async def _new_training_id(ctx: Context, org_id: str, requested: str | None) -> str:
    try:
        return training_id_for(org_id, requested, uuid.uuid4().hex[:12])
    except ValueError as exc:
        await ctx.reject("rest", "invalid_body", str(exc))
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc


@router.post("/training/start", status_code=status.HTTP_202_ACCEPTED, response_model=StartResponse)
async def start_training(body: StartRequest, ctx: Context, trainings: Trainings, orgs: Orgs,
                         principal: ApiKey) -> StartResponse:
    """Queue a training in a project of the key's organisation; its id is ``<org>.<name>``
    (a bare name in the default organisation)."""
    org_id, project_id = await _owner(ctx, orgs, principal, body)
    training_id = await _new_training_id(ctx, org_id, body.training_id)
    if body.training_id and await trainings.get(training_id) is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"training '{training_id}' exists")
    config = TrainingConfig.model_validate(body.model_dump(exclude={"training_id", "project_id", "org_id"}))
    if isinstance(config.model, UploadedModel):
        record = await model_record(ctx, principal, config.model.model_id, org_id)
        if config.model.digest not in (None, record.digest):
            raise HTTPException(status.HTTP_409_CONFLICT, detail=(
                f"model '{record.model_id}' has digest {record.digest}; the request names {config.model.digest}"))
        config = config.model_copy(update={"model": UploadedModel(model_id=record.model_id, digest=record.digest)})
    command = StartTraining(training_id=training_id, config=config, org_id=org_id, project_id=project_id)
    await ctx.redis.xadd(ctx.keys.control_stream, encode(command))
    return StartResponse(training_id=training_id)


@router.get("/trainings")
async def list_trainings(trainings: Trainings, principal: Viewer) -> list[dict[str, Any]]:
    """The newest trainings the key may see (its organisation's; every one for the bootstrap key)."""
    return [_public(s) for s in await trainings.get_many(await trainings.list_ids(org_id=principal.org_id))]


@router.get("/training/{training_id}/status")
async def training_status(training_id: str, trainings: Trainings, ctx: Context) -> dict[str, Any]:
    """The training's state, its model's layout (``layers``, once fixed) and the agents whose model is
    not the training's (``model_refusals``: agent, reason, the layer and both layouts)."""
    state = await _state(trainings, training_id)
    refusals = await ModelRefusals(ctx.redis, ctx.keys).list(training_id)
    return {**_public(state), "layers": _layout(state),
            "model_refusals": [refusal.model_dump(mode="json") for refusal in refusals]}


@router.post("/training/{training_id}/stop", status_code=status.HTTP_202_ACCEPTED)
async def stop_training(training_id: str, ctx: Context, trainings: Trainings, _auth: ApiKey,
                        body: StopRequest | None = None) -> dict[str, str]:
    await _state(trainings, training_id)
    command = StopTraining(training_id=training_id, reason=(body or StopRequest()).reason)
    await ctx.redis.xadd(ctx.keys.control_stream, encode(command))
    return {"training_id": training_id, "status": "stopping"}


@router.get("/training/{training_id}/metrics", response_model=list[RoundMetrics])
async def training_metrics(training_id: str, trainings: Trainings) -> list[RoundMetrics]:
    await _state(trainings, training_id)
    return await trainings.metrics(training_id)


@router.get("/training/{training_id}/versions", response_model=list[VersionRecord])
async def training_versions(training_id: str, trainings: Trainings, versions: Versions) -> list[VersionRecord]:
    await _state(trainings, training_id)
    return await versions.history(training_id)


def _version_api(ctx: Context) -> ModelVersionManager:
    return ModelVersionManager(ctx)


VersionApi = Annotated[ModelVersionManager, Depends(_version_api)]


@contextmanager
def _version_errors() -> Iterator[None]:
    """The version API's errors as HTTP answers: unknown training or version 404, unservable model 410."""
    try:
        yield
    except (UnknownTraining, UnknownVersion) as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc
    except VersionUnavailable as exc:
        raise HTTPException(status.HTTP_410_GONE, detail=exc.detail) from exc


@router.get("/training/{training_id}/versions/{version}/model",
            response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
async def download_model(training_id: str, version: int, api: VersionApi, settings: AppSettings,
                         format: Literal["safetensors", "json"] = "safetensors") -> Response:
    """The version's weights as a safetensors file (from the bus, else from its checkpoint), or with
    ``?format=json`` as ``{"version", "weights": {layer: nested lists}}`` for clients without safetensors."""
    with _version_errors():
        model = await api.get_model_version(version, training_id)
    if format == "json":
        if len(model.data) > MAX_JSON_MODEL_BYTES:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=(
                f"a model of {len(model.data)} bytes is served as safetensors only (JSON up to "
                f"{MAX_JSON_MODEL_BYTES} bytes)"))
        content = await asyncio.to_thread(_model_json, training_id, version, model.data, settings.max_blob_bytes)
        return Response(media_type="application/json", headers={"X-Model-SHA256": model.record.model_digest},
                        content=content)
    return Response(content=model.data, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{training_id}-v{version}.safetensors"',
        "X-Model-SHA256": model.record.model_digest,
    })


MAX_JSON_MODEL_BYTES = 16 * 1024 * 1024
"""Largest model served as JSON: nested lists cost ~10x the bytes in Python objects."""


def _model_json(training_id: str, version: int, data: bytes, max_bytes: int) -> str:
    layers = decode_layers(data, max_bytes=max_bytes)
    return json.dumps({"training_id": training_id, "version": version, "weights": {
        name: np.asarray(layer, dtype=np.float64 if is_float(layer.dtype.name) else layer.dtype).tolist()
        for name, layer in layers.items()}})


@router.get("/training/{training_id}/versions/{version}/lineage", response_model=list[VersionRecord])
async def version_lineage(training_id: str, version: int, api: VersionApi) -> list[VersionRecord]:
    """The version and its ancestors by parent link, newest first."""
    with _version_errors():
        return await api.lineage(training_id, version)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=0)
    reason: str = Field(default="rolled back by operator", max_length=500)


@router.post("/training/{training_id}/rollback", status_code=status.HTTP_202_ACCEPTED)
async def rollback_training(training_id: str, body: RollbackRequest, api: VersionApi,
                            _auth: ApiKey) -> dict[str, Any]:
    """Continue the training from an earlier version (takes effect for the next round)."""
    with _version_errors():
        await api.rollback_to_version(training_id, body.version, body.reason)
    return {"training_id": training_id, "rollback_to": body.version, "status": "requested"}


@router.get("/training/{training_id}/versions/compare")
async def compare(training_id: str, a: int, b: int, api: VersionApi) -> dict[str, Any]:
    """Per-layer L2 distance and cosine similarity of two versions, and their metric deltas."""
    with _version_errors():
        result = await api.compare_versions(training_id, a, b)
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
