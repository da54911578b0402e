"""The models organisations upload (``POST /api/models``): a record per model, the bytes as a blob.

A model is any ordered set of named arrays in a safetensors file. Its id is derived from its
content (``m-`` and 16 hex digits of its SHA-256), so uploading the same file twice gives the
same model. The bytes are kept without expiry under the organisation's upload namespace
(``Keys.model_owner``) until the coordinator copies them into version 0 of a training.
"""

from __future__ import annotations

import time

import numpy as np
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from federated_learning.bus.blobs import BlobStore
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.tensors import (
    InvalidTensor,
    decode_layers,
    digest_of,
    is_float,
    spec_of,
    validate_layers,
)
from federated_learning.types import NamedLayers


class LayerInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    shape: list[int]
    dtype: str


class ModelRecord(BaseModel):
    """What the REST answer and the store say of one uploaded model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model_id: str
    org_id: str
    digest: str
    name: str = ""
    layers: list[LayerInfo]
    parameters: int = Field(description="number of values over all layers")
    bytes: int = Field(description="size of the safetensors file")
    created_at: float = Field(default_factory=time.time)


def model_id_of(digest: str) -> str:
    return f"m-{digest[:16]}"


def describe_model(layers: NamedLayers) -> list[LayerInfo]:
    return [LayerInfo(name=name, shape=list(shape), dtype=dtype) for name, (shape, dtype) in spec_of(layers).items()]


def check_user_model(data: bytes, *, max_bytes: int) -> NamedLayers:
    """The layers of an uploaded model file; raises :class:`InvalidTensor` naming what is wrong
    (too large, not safetensors, a dtype we cannot train, NaN/Inf, no float layer)."""
    layers = decode_layers(data, max_bytes=max_bytes)
    if not layers:
        raise InvalidTensor("bad_layers", "the file holds no tensor")
    validate_layers(layers, spec_of(layers))
    if not any(is_float(layer.dtype.name) and layer.size > 0 for layer in layers.values()):
        raise InvalidTensor("bad_layers", "the model has no float values to train (only integer or empty layers)")
    return layers


class ModelStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, blobs: BlobStore) -> None:
        self._redis = redis
        self._keys = keys
        self._blobs = blobs

    async def add(self, org_id: str, data: bytes, *, name: str = "") -> ModelRecord:
        """Validate and store an uploaded model (idempotent for the same bytes)."""
        layers = check_user_model(data, max_bytes=self._blobs.max_bytes)
        digest = digest_of(data)
        record = ModelRecord(
            model_id=model_id_of(digest), org_id=org_id, digest=digest, name=name,
            layers=describe_model(layers), parameters=int(sum(np.size(a) for a in layers.values())),
            bytes=len(data))
        existing = await self.get(org_id, record.model_id)
        if existing is not None:
            return existing
        await self._blobs.put(data, owner=Keys.model_owner(org_id))
        await self._redis.hset(self._keys.models(org_id), record.model_id, record.model_dump_json())
        return record

    async def get(self, org_id: str, model_id: str) -> ModelRecord | None:
        raw = await self._redis.hget(self._keys.models(org_id), model_id)
        return None if raw is None else ModelRecord.model_validate_json(raw)

    async def list(self, org_id: str) -> list[ModelRecord]:
        raw = await self._redis.hvals(self._keys.models(org_id))
        return sorted((ModelRecord.model_validate_json(v) for v in raw), key=lambda r: r.created_at)

    async def data(self, org_id: str, digest: str) -> bytes:
        """The model file's bytes (raises ``BlobMissing`` when gone)."""
        return await self._blobs.get(digest, owner=Keys.model_owner(org_id))
