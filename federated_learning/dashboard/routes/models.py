"""The user's own models: ``POST /api/models`` takes a safetensors file, a training names it.

``POST /api/models`` (operator key; body = the safetensors file, ``Content-Type:
application/octet-stream``, at most ``max_blob_bytes``; optional ``X-Model-Name``) answers
``{"model_id", "layers": [{name, shape, dtype}], "parameters", ...}``. The model belongs to the
key's organisation; ``POST /api/training/start`` with ``"model": {"model_id": ...}`` trains it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status

from federated_learning.access import DEFAULT_ORG, Principal
from federated_learning.bus.blobs import BlobMissing
from federated_learning.dashboard.auth import ApiKey, Viewer, ensure_org
from federated_learning.dashboard.deps import Context
from federated_learning.dashboard.routes.sync import SAFETENSORS, read_limited_body
from federated_learning.protocol.tensors import InvalidTensor
from federated_learning.records.models import ModelRecord, ModelStore

router = APIRouter(prefix="/api", tags=["models"])


async def _org(ctx: Context, principal: Principal, org_id: str | None) -> str:
    org = org_id or principal.org_id or DEFAULT_ORG
    await ensure_org(ctx, principal, org)
    return org


def store_of(ctx: Context) -> ModelStore:
    return ModelStore(ctx.redis, ctx.keys, ctx.blobs)


@router.post("/models", status_code=status.HTTP_201_CREATED, response_model=ModelRecord)
async def upload_model(request: Request, ctx: Context, principal: ApiKey,
                       org_id: Annotated[str | None, Query(max_length=128)] = None,
                       x_model_name: Annotated[str | None, Header(max_length=200)] = None) -> ModelRecord:
    """Store a model (a safetensors file of named float16/bfloat16/float32/float64 layers, and
    integer buffers) for the key's organisation; the same file twice is the same model."""
    org = await _org(ctx, principal, org_id)
    if not request.headers.get("content-type", "").startswith(SAFETENSORS):
        await ctx.reject("rest", "invalid_body", "model upload without Content-Type application/octet-stream")
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            detail="send the safetensors file as the body, Content-Type: application/octet-stream")
    body = await read_limited_body(request, ctx, "rest")
    try:
        return await store_of(ctx).add(org, body, name=x_model_name or "")
    except InvalidTensor as exc:
        await ctx.reject("rest", exc.reason, f"model upload: {exc.detail}")
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"not a usable model: {exc}") from exc


@router.get("/models", response_model=list[ModelRecord])
async def list_models(ctx: Context, principal: Viewer,
                      org_id: Annotated[str | None, Query(max_length=128)] = None) -> list[ModelRecord]:
    return await store_of(ctx).list(await _org(ctx, principal, org_id))


async def model_record(ctx: Context, principal: Principal, model_id: str, org_id: str | None) -> ModelRecord:
    """The organisation's model (404 when it has none of that id)."""
    record = await store_of(ctx).get(await _org(ctx, principal, org_id), model_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no model '{model_id}' (upload it with POST /api/models)")
    return record


@router.get("/models/{model_id}", response_model=ModelRecord)
async def get_model(model_id: str, ctx: Context, principal: Viewer,
                    org_id: Annotated[str | None, Query(max_length=128)] = None) -> ModelRecord:
    return await model_record(ctx, principal, model_id, org_id)


@router.get("/models/{model_id}/file")
async def download_model(model_id: str, ctx: Context, principal: Viewer,
                         org_id: Annotated[str | None, Query(max_length=128)] = None) -> Response:
    record = await model_record(ctx, principal, model_id, org_id)
    try:
        data = await store_of(ctx).data(record.org_id, record.digest)
    except BlobMissing as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"the file of model '{model_id}' is gone") from exc
    return Response(content=data, media_type=SAFETENSORS,
                    headers={"Content-Disposition": f'attachment; filename="{model_id}.safetensors"'})
