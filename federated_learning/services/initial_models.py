"""Reads and writes behind version 0 (the decisions are in :mod:`federated_learning.coordination.initial`):
building a preset's or an empty bank's bytes, copying an uploaded model from the organisation's
store, checking a model's bytes, and keeping an agent's refusal of the training's model."""

from __future__ import annotations

from federated_learning.bus.blobs import BlobMissing, BlobStore
from federated_learning.coordination.state import TrainingState
from federated_learning.models import initial_model
from federated_learning.protocol.banks import empty_bank_version
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import FirstAgentModel, MemoryBankModel, PresetModel
from federated_learning.protocol.tensors import decode_layers, encode_layers
from federated_learning.records.models import check_user_model
from federated_learning.types import NamedLayers


async def initial_model_bytes(state: TrainingState, blobs: BlobStore) -> bytes:
    """The initial model's safetensors bytes (preset, empty bank or uploaded); raises ValueError
    with the reason."""
    spec = state.config.model
    if isinstance(spec, PresetModel):
        return encode_layers(initial_model(spec))
    if isinstance(spec, MemoryBankModel):
        return empty_bank_version(spec)
    assert not isinstance(spec, FirstAgentModel)
    if spec.digest is None:
        raise ValueError(f"model '{spec.model_id}' names no file (start the training through the REST "
                         "API or the Python client, which resolve model_id)")
    try:
        return await blobs.get(spec.digest, owner=Keys.model_owner(state.org_id))
    except BlobMissing as exc:
        raise ValueError(f"model '{spec.model_id}' is not stored for organisation '{state.org_id}'") from exc


def check_initial_model(state: TrainingState, data: bytes, max_bytes: int) -> NamedLayers:
    """The layers of ``data`` as a model of the training (InvalidTensor, a ValueError, says why not)."""
    if isinstance(state.config.model, MemoryBankModel):
        return decode_layers(data, max_bytes=max_bytes)  # an empty bank: nothing to train, by design
    return check_user_model(data, max_bytes=max_bytes)
