"""Memory-bank blobs: what an agent uploads and what a memory-bank version holds.

An agent's upload is one tensor ``bank`` (rows x feature_dim, float), at least one row and at
most the training's ``max_rows_per_agent``. A version holds ``bank`` (rows x feature_dim,
float32; version 0 has no rows) and ``examples`` (int64 scalar: how many examples the rows
stand for, which weighs the bank when a later round merges new uploads into it).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from federated_learning.protocol.messages import BANK_EXAMPLES_LAYER, BANK_LAYER, MemoryBankModel
from federated_learning.protocol.tensors import (
    InvalidTensor,
    decode_layers,
    encode_layers,
    is_float,
)

BANK_UPLOAD_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


def encode_bank_version(bank: NDArray[np.floating], examples: int) -> bytes:
    """Safetensors bytes of a memory-bank version."""
    return encode_layers({BANK_LAYER: np.ascontiguousarray(bank, dtype=np.float32),
                          BANK_EXAMPLES_LAYER: np.asarray(examples, dtype=np.int64)})


def empty_bank_version(spec: MemoryBankModel) -> bytes:
    """Version 0 of a memory-bank training: no rows yet."""
    return encode_bank_version(np.zeros((0, spec.feature_dim), dtype=np.float32), 0)


def decode_bank_version(data: bytes, spec: MemoryBankModel, *, max_bytes: int
                        ) -> tuple[NDArray[np.float32], int]:
    """(bank, examples) of a memory-bank version; InvalidTensor when it is not one of ``spec``."""
    layers = decode_layers(data, max_bytes=max_bytes)
    if set(layers) != {BANK_LAYER, BANK_EXAMPLES_LAYER}:
        raise InvalidTensor("bad_layers", f"a memory-bank version holds '{BANK_LAYER}' and "
                                          f"'{BANK_EXAMPLES_LAYER}'; got {sorted(layers)}")
    bank, examples = layers[BANK_LAYER], layers[BANK_EXAMPLES_LAYER]
    if bank.ndim != 2 or bank.shape[1] != spec.feature_dim or bank.dtype != np.float32:
        raise InvalidTensor("bad_shape", f"memory-bank version: '{BANK_LAYER}' is {bank.shape} "
                                         f"{bank.dtype.name}; expected (rows, {spec.feature_dim}) float32")
    if examples.shape != () or examples.dtype != np.int64 or int(examples) < 0:
        raise InvalidTensor("bad_shape", f"memory-bank version: '{BANK_EXAMPLES_LAYER}' must be a "
                                         "non-negative int64 scalar")
    return bank, int(examples)


def check_bank_rows(bank: NDArray[np.generic], spec: MemoryBankModel, *, who: str = "the bank") -> None:
    """Refuse (InvalidTensor with the reason) rows that are not an upload of ``spec``'s training."""
    if bank.ndim != 2 or bank.shape[1] != spec.feature_dim:
        raise InvalidTensor("bad_shape", f"{who} has shape {bank.shape}; the training's banks are "
                                         f"rows x {spec.feature_dim}")
    if bank.dtype.name not in BANK_UPLOAD_DTYPES:
        raise InvalidTensor("bad_dtype", f"{who} is {bank.dtype.name}; bank rows are float16, bfloat16, "
                                         "float32 or float64")
    if not 1 <= bank.shape[0] <= spec.max_rows_per_agent:
        raise InvalidTensor("too_large" if bank.shape[0] else "bad_shape",
                            f"{who} has {bank.shape[0]} rows; an agent uploads 1 to "
                            f"{spec.max_rows_per_agent} (max_rows_per_agent)")
    if not np.isfinite(bank).all():
        raise InvalidTensor("not_finite", f"{who} holds NaN or Inf")


def decode_bank_upload(data: bytes, spec: MemoryBankModel, *, max_bytes: int) -> NDArray[np.float32]:
    """The rows of an agent's bank upload as float32; InvalidTensor naming what is wrong."""
    layers = decode_layers(data, max_bytes=max_bytes, allowed_dtypes=BANK_UPLOAD_DTYPES)
    if set(layers) != {BANK_LAYER}:
        raise InvalidTensor("bad_layers", f"a bank upload holds one tensor '{BANK_LAYER}'; got {sorted(layers)}")
    bank = layers[BANK_LAYER]
    check_bank_rows(bank, spec, who="the uploaded bank")
    assert is_float(bank.dtype.name)
    return np.ascontiguousarray(bank, dtype=np.float32)
