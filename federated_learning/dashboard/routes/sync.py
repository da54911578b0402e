"""Plain-HTTP model sync for simple clients (seed 000's daily sync): ``POST /sync_model``.

A client that cannot speak Redis posts its local model; the dashboard, acting as a gateway,
registers it as a volunteer agent ``http-<client_id>`` (``http-<org>.<project>.<client_id>``
outside the default project; its first join carries a one-off join token of the training's
project), signs a notice for it with the gateway's own Ed25519 key, and feeds the update into
the training like any agent's (the coordinator accepts a volunteer's update trained from a
version within the training's ``max_staleness`` of the current one, and the aggregator re-bases
it onto the current model). The answer is the current global model, as JSON or as safetensors. A key feeds only its organisation's trainings.

Two forms: JSON ``{client_id, training_id?, base_version?, weights: {layer: nested lists},
metrics: {num_examples, accuracy?, loss?}}``, or a safetensors body (any layer order: it is put in
the model's) with the fields as ``X-Client-Id``, ``X-Training-Id``, ``X-Base-Version``,
``X-Num-Examples``, ``X-Accuracy`` and ``X-Loss`` headers. A body over ``max_blob_bytes`` is
refused (413) from its ``Content-Length``, else as soon as that much has arrived: it is never
held whole.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from federated_learning.access import DEFAULT_ORG, DEFAULT_PROJECT, Principal
from federated_learning.dashboard.auth import ApiKey, forbid
from federated_learning.dashboard.deps import Context, Trainings
from federated_learning.privacy.signing import AgentKeyPair
from federated_learning.protocol.messages import (
    AgentJoined,
    Evaluation,
    FirstAgentModel,
    Heartbeat,
    Identifier,
    Severity,
    TaskKind,
    TrainingStatus,
    UpdateSubmitted,
    encode,
)
from federated_learning.protocol.tensors import (
    InvalidTensor,
    LayerSpec,
    decode_layers,
    encode_layers,
    validate_layers,
)
from federated_learning.protocol.trainings import TrainingView
from federated_learning.records.join_tokens import JoinTokens
from federated_learning.records.model_refusals import ModelRefusal, ModelRefusals
from federated_learning.records.models import check_user_model
from federated_learning.types import NamedLayers

router = APIRouter(tags=["sync"])

HTTP_AGENT_PREFIX = "http-"
SAFETENSORS = "application/octet-stream"
GATEWAY_TOKEN_TTL_S = 600.0
REGISTRATION_WAIT_S = 10.0
"""How long a client's first sync waits for the coordinator to register it before its update goes
out (an update from an agent the registry does not know yet would be refused)."""
REGISTRATION_POLL_S = 0.02


class RegistrationPending(Exception):
    """A client's join was not registered in time (the coordinator is busy, taking over, or refused it)."""
MAX_NUM_EXAMPLES = 1_000_000_000
MAX_JSON_VALUES = 1_000_000
"""Most numbers the JSON form carries either way: parsed, each costs ~32 bytes of Python objects
whatever its text (``0,`` is two bytes), so the form is bounded by count, not only by size.
Larger models sync in the binary (safetensors) form."""


class InvalidHeader(ValueError):
    """A binary-form header that is not a number in its range; the message names the header and value."""


def host_client_id() -> str:
    """This host's name as a client id (dots, as in a fully qualified name, become dashes)."""
    return socket.gethostname().replace(".", "-")[:48] or "client"


ClientId = Annotated[str, Field(min_length=1, max_length=48, pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$",
                                description="letters, digits, '_' and '-' (no dot: dots separate the "
                                            "organisation and project in volunteer ids)")]

class SyncMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_examples: StrictInt = Field(default=1, gt=0, le=MAX_NUM_EXAMPLES)
    accuracy: StrictFloat | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    loss: StrictFloat | None = Field(default=None, ge=0, allow_inf_nan=False)


class SyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: ClientId = Field(default_factory=host_client_id)
    training_id: Identifier | None = None
    base_version: int | None = Field(default=None, ge=0)
    weights: dict[str, list[Any] | float]
    metrics: SyncMetrics = Field(default_factory=SyncMetrics)


def _header_number(name: str, raw: str | None, low: float, high: float, *, integer: bool = False) -> float | None:
    """``raw`` as a finite number in [low, high]; None when the header is absent."""
    if raw is None:
        return None
    if integer:
        rule = f"an integer in [{low:.0f}, {high:.0f}]"
    else:
        rule = f"a finite number in [{low:g}, {high:g}]" if math.isfinite(high) else f"a finite number >= {low:g}"
    try:
        value = float(int(raw)) if integer else float(raw)
    except (ValueError, OverflowError):
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidHeader(f"header {name} is {raw[:40]!r}; must be {rule}")
    return value


def metrics_from_headers(num_examples: str | None, accuracy: str | None, loss: str | None) -> SyncMetrics:
    """The binary form's ``X-Num-Examples``, ``X-Accuracy`` and ``X-Loss``, checked as the JSON form's
    ``metrics`` are; raises :class:`InvalidHeader` naming the header and its value."""
    examples = _header_number("X-Num-Examples", num_examples, 1, MAX_NUM_EXAMPLES, integer=True)
    return SyncMetrics(num_examples=1 if examples is None else int(examples),
                       accuracy=_header_number("X-Accuracy", accuracy, 0.0, 1.0),
                       loss=_header_number("X-Loss", loss, 0.0, math.inf))


def in_model_order(layers: NamedLayers, spec: LayerSpec) -> NamedLayers:
    """``layers`` in the order of ``spec`` when they hold exactly its names (a standard safetensors
    file lists its tensors in its own order: by dtype size, then name); otherwise unchanged, for
    :func:`validate_layers` to name the missing and unexpected layers."""
    if set(layers) != set(spec):
        return layers
    return {name: layers[name] for name in spec}


async def read_limited_body(request: Request, ctx: Context, source: str = "sync") -> bytes:
    """The request body, refused (413) from its ``Content-Length`` or once more than
    ``max_blob_bytes`` has arrived, so an oversized body is never held whole."""
    limit = ctx.settings.max_blob_bytes
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        await ctx.reject(source, "too_large", f"Content-Length {declared} bytes")
        raise HTTPException(413, detail=f"body of {declared} bytes exceeds max_blob_bytes ({limit})")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            await ctx.reject(source, "too_large", f"body over {limit} bytes")
            raise HTTPException(413, detail=f"body exceeds max_blob_bytes ({limit})")
        chunks.append(chunk)
    return b"".join(chunks)


def gateway_identity(ctx: Any) -> AgentKeyPair:
    """The gateway's signing key, kept in the data folder across restarts."""
    identity: AgentKeyPair | None = getattr(ctx, "_gateway_identity", None)
    if identity is None:
        identity = AgentKeyPair.load_or_generate(ctx.settings.data_dir / "secrets" / "gateway")
        ctx._gateway_identity = identity
    return identity


async def _training(ctx: Context, trainings: Trainings, principal: Principal, training_id: str | None) -> TrainingView:
    """The named training (403 when it is another organisation's), or the key's organisation's newest
    running one; 409 when it is not running."""
    ids = [training_id] if training_id else await trainings.list_ids(org_id=principal.org_id)
    for candidate in ids:
        state = await trainings.get(candidate)
        if state is not None and not principal.may_access(state.org_id):
            await forbid(ctx, principal, f"training '{candidate}' belongs to another organisation")
        awaits_first_model = state is not None and state.status is TrainingStatus.INITIALIZING \
            and isinstance(state.config.model, FirstAgentModel) and not state.layer_spec
        if state is not None and (state.status in (TrainingStatus.RUNNING, TrainingStatus.PAUSED)
                                  or awaits_first_model):
            if state.config.secure_aggregation:
                raise HTTPException(status.HTTP_409_CONFLICT, detail=(
                    f"training '{state.training_id}' uses secure aggregation: only bus agents, which take "
                    "part in the masking exchange, can contribute"))
            if state.config.kind == "memory_bank":
                if not training_id:
                    continue  # the newest training that takes models
                raise HTTPException(status.HTTP_409_CONFLICT, detail=(
                    f"training '{state.training_id}' merges memory banks: agents upload feature banks with "
                    "`python -m agents run` (docs/memory-banks.md), not model weights"))
            return state
    raise HTTPException(status.HTTP_409_CONFLICT,
                        detail=f"training '{training_id}' is not running" if training_id else "no running training")


def _numbers(name: str, value: list[Any] | float) -> NDArray[Any]:
    """A layer's JSON value as an array of numbers: strings, booleans, nulls and ragged lists are
    refused, not converted (numpy would read "1.5" and true as numbers)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidTensor("bad_shape", f"layer '{name}' is not a numeric array: {exc}") from exc
    if array.dtype.kind not in "iuf":
        raise InvalidTensor("bad_dtype", f"layer '{name}' holds {array.dtype.name} values (strings, booleans, "
                                         "nulls or ragged lists); weights are numbers")
    return array


def _layers_from_json(weights: dict[str, list[Any] | float], state: TrainingView) -> NamedLayers:
    if not state.layer_spec:  # the first model of a from_first_agent training: float32 layers
        try:
            return {name: _numbers(name, value).astype(np.float32) for name, value in weights.items()}
        except OverflowError as exc:
            raise InvalidTensor("bad_shape", f"weights are not float32 numbers: {exc}") from exc
    layers: NamedLayers = {}
    for name, (_shape, dtype) in state.layer_spec.items():
        if name not in weights:
            raise InvalidTensor("bad_layers", f"layer '{name}' is missing")
        array = _numbers(name, weights[name])
        try:
            layers[name] = array.astype(dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidTensor("bad_shape", f"layer '{name}' is not a numeric array of {dtype}: {exc}") from exc
    unexpected = sorted(set(weights) - set(state.layer_spec))
    if unexpected:
        raise InvalidTensor("bad_layers", f"unexpected layers {unexpected}")
    return layers


async def _submit(ctx: Context, state: TrainingView, client_id: str, layers: NamedLayers,
                  base_version: int | None, metrics: SyncMetrics) -> str:
    """Register the client (first time), upload its model and a signed notice; return its agent id.
    In a training still waiting for its first model, the notice offers the client's model as version 0."""
    first = not state.layer_spec
    blob = encode_layers(layers)
    if first:
        check_user_model(blob, max_bytes=ctx.settings.max_blob_bytes)
    else:
        validate_layers(layers, state.layer_spec)
    identity = gateway_identity(ctx)
    agent_id = volunteer_id(state, client_id)
    joined = AgentJoined(agent_id=agent_id, datasets={state.config.dataset: metrics.num_examples},
                         device={"kind": "http-sync"}, public_key=identity.public_key_bytes.hex(), volunteer=True,
                         join_token=await _project_token(ctx, state, agent_id))
    registered = await ctx.redis.hexists(ctx.keys.agents, agent_id)
    for message in (joined, Heartbeat(agent_id=agent_id)):  # signed with the gateway's key, as the notice
        signed = message.model_copy(update={"signature": identity.sign(message.signed_bytes()).hex()})
        await ctx.redis.xadd(ctx.keys.agent_stream, encode(signed))
    if not registered:
        await _registered(ctx, agent_id)
    digest = await ctx.blobs.put(blob, ttl_s=24 * 3600, owner=agent_id)
    evaluation = None
    if metrics.accuracy is not None and metrics.loss is not None:
        evaluation = Evaluation(accuracy=metrics.accuracy, loss=metrics.loss, num_examples=metrics.num_examples)
    notice = UpdateSubmitted(kind=TaskKind.PARAMETERS if first else TaskKind.TRAIN, training_id=state.training_id,
                             round=state.round, attempt=max(state.attempt, 1), agent_id=agent_id,
                             update_digest=digest, num_examples=metrics.num_examples,
                             received_model_version=(state.current_version or 0) if base_version is None else base_version,
                             evaluation=evaluation)
    notice = notice.model_copy(update={"signature": identity.sign(notice.signed_bytes()).hex()})
    await ctx.redis.xadd(ctx.keys.update_stream, encode(notice))
    return agent_id


async def _registered(ctx: Context, agent_id: str) -> None:
    """Return once the coordinator has registered ``agent_id`` (its join handled); raise
    :class:`RegistrationPending` after ``REGISTRATION_WAIT_S``. The join and the update travel on
    two streams, which a coordinator with several partitions reads in different groups: the update
    goes out only after the join took effect."""
    deadline = asyncio.get_running_loop().time() + REGISTRATION_WAIT_S
    while not await ctx.redis.hexists(ctx.keys.agents, agent_id):
        if asyncio.get_running_loop().time() >= deadline:
            raise RegistrationPending(f"the coordinator has not registered {agent_id} within "
                                      f"{REGISTRATION_WAIT_S:.0f} s; sync again")
        await asyncio.sleep(REGISTRATION_POLL_S)


def volunteer_id(state: TrainingView, client_id: str) -> str:
    """``http-<client>`` in the default project, ``http-<org>.<project>.<client>`` in others, so
    one client id in two projects is two agents, each bound to its project. Client ids hold no
    dot and organisation and project ids none either, so no client id of one project can name
    another project's volunteer."""
    scope = "" if state.project == (DEFAULT_ORG, DEFAULT_PROJECT) else f"{state.org_id}.{state.project_id}."
    return f"{HTTP_AGENT_PREFIX}{scope}{client_id}"


async def _project_token(ctx: Context, state: TrainingView, agent_id: str) -> str | None:
    """A one-off join token of the training's project for a volunteer's first join (None once it is registered)."""
    if await ctx.redis.hexists(ctx.keys.agents, agent_id):
        return None
    token, _record = await JoinTokens(ctx.redis, ctx.keys).create(
        f"http-sync gateway: {agent_id}", max_uses=1, org_id=state.org_id, project_id=state.project_id,
        ttl_s=GATEWAY_TOKEN_TTL_S)
    return token


async def _current_model(ctx: Context, state: TrainingView) -> tuple[bytes, NamedLayers]:
    assert state.current_digest is not None
    data = await ctx.blobs.get(state.current_digest)
    return data, decode_layers(data, max_bytes=ctx.settings.max_blob_bytes)


@router.post("/sync_model")
async def sync_model(request: Request, ctx: Context, trainings: Trainings, principal: ApiKey,
                     x_client_id: Annotated[str | None, Header()] = None,
                     x_training_id: Annotated[str | None, Header()] = None,
                     x_base_version: Annotated[int | None, Header()] = None,
                     x_num_examples: Annotated[str | None, Header()] = None,
                     x_accuracy: Annotated[str | None, Header()] = None,
                     x_loss: Annotated[str | None, Header()] = None) -> Response:
    """Take a client's local model into the current round; answer with the current global model."""
    binary = request.headers.get("content-type", "").startswith(SAFETENSORS)
    metrics: SyncMetrics | None = None
    if binary:
        try:
            metrics = metrics_from_headers(x_num_examples, x_accuracy, x_loss)
        except InvalidHeader as exc:
            await ctx.reject("sync", "invalid_header", str(exc))
            raise HTTPException(422, detail=str(exc)) from exc
    body = await read_limited_body(request, ctx)
    if not binary and body.count(b",") + 1 > MAX_JSON_VALUES:
        detail = (f"the JSON form carries at most {MAX_JSON_VALUES} values; send the model as safetensors "
                  "(Content-Type: application/octet-stream)")
        await ctx.reject("sync", "too_large", detail)
        raise HTTPException(413, detail=detail)
    try:
        if metrics is not None:
            sync = SyncRequest(client_id=x_client_id or host_client_id(), training_id=x_training_id,
                               base_version=x_base_version, weights={}, metrics=metrics)
        else:
            sync = SyncRequest.model_validate_json(body)
    except ValueError as exc:
        await ctx.reject("sync", "invalid_body", str(exc)[:300])
        raise HTTPException(422, detail=str(exc)[:500]) from exc
    state = await _training(ctx, trainings, principal, sync.training_id)
    if not binary and sum(int(np.prod(shape)) for shape, _dtype in state.layer_spec.values()) > MAX_JSON_VALUES:
        detail = (f"training '{state.training_id}' has a model of more than {MAX_JSON_VALUES} values: sync it as "
                  "safetensors (Content-Type: application/octet-stream)")
        await ctx.reject("sync", "too_large", detail, training_id=state.training_id)
        raise HTTPException(413, detail=detail)
    stale = _stale_base(state, sync.base_version)
    if stale is not None:
        await ctx.reject("sync", "stale_base", stale, training_id=state.training_id)
        raise HTTPException(status.HTTP_409_CONFLICT, detail=stale)
    try:
        layers = (in_model_order(decode_layers(body, max_bytes=ctx.settings.max_blob_bytes), state.layer_spec)
                  if binary else await asyncio.to_thread(_layers_from_json, sync.weights, state))
        agent_id = await _submit(ctx, state, sync.client_id, layers, sync.base_version, sync.metrics)
    except RegistrationPending as exc:
        await ctx.reject("sync", "registration_pending", str(exc), training_id=state.training_id)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc),
                            headers={"Retry-After": "1"}) from exc
    except InvalidTensor as exc:
        await ctx.reject("sync", exc.reason, exc.detail, training_id=state.training_id)
        if state.layer_spec:
            refusal = ModelRefusal(
                agent_id=volunteer_id(state, sync.client_id), reason=exc.reason, source="sync",
                detail=f"the model synced by HTTP client '{sync.client_id}' is not the training's: {exc.detail}")
            if await ModelRefusals(ctx.redis, ctx.keys).add(state.training_id, refusal):
                await ctx.emit("model_refused", refusal.detail, severity=Severity.WARNING,
                               training_id=state.training_id, agent_id=refusal.agent_id, reason=exc.reason)
        raise HTTPException(422, detail=f"your model is not the training's model: {exc}") from exc
    if not state.layer_spec:
        return Response(status_code=status.HTTP_202_ACCEPTED, media_type="application/json", content=json.dumps({
            "training_id": state.training_id, "agent_id": agent_id, "update": "initial_model",
            "detail": "the training had no model yet: yours is offered as its version 0 (the first model "
                      "fixes the layout); sync again for the global model"}))
    data, model = await _current_model(ctx, state)
    headers = {"X-Training-Id": state.training_id, "X-Model-Version": str(state.current_version),
               "X-Model-SHA256": state.current_digest or "", "X-Agent-Id": agent_id}
    if binary:
        return Response(content=data, media_type=SAFETENSORS, headers=headers)
    return Response(content=_json_model(state, model, agent_id), media_type="application/json", headers=headers)


def _stale_base(state: TrainingView, base_version: int | None) -> str | None:
    """Why the coordinator would drop an update trained from ``base_version``, or None: it takes
    updates from the current version or, within ``max_staleness``, a recent one."""
    if base_version is None or state.current_version is None:
        return None
    oldest = max(0, state.current_version - state.config.max_staleness)
    if oldest <= base_version <= state.current_version:
        return None
    return (f"base_version {base_version} is not a recent version of training '{state.training_id}': the current "
            f"version is {state.current_version} and updates from versions {oldest} to {state.current_version} are "
            "taken; sync without base_version (or with the version you received) to get the current model")


def _json_model(state: TrainingView, model: NamedLayers, agent_id: str) -> str:
    return json.dumps({"training_id": state.training_id, "version": state.current_version,
                       "model_sha256": state.current_digest, "agent_id": agent_id, "update": "submitted",
                       "weights": {name: layer.tolist() for name, layer in model.items()}})
