"""Memory-bank blobs and training requests: what is a bank upload, a bank version, a bank training."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from federated_learning.protocol.banks import (
    decode_bank_upload,
    decode_bank_version,
    empty_bank_version,
    encode_bank_version,
)
from federated_learning.protocol.messages import MemoryBankModel, TrainingConfig
from federated_learning.protocol.tensors import InvalidTensor, encode_layers

SPEC = MemoryBankModel(kind="memory_bank", feature_dim=4, max_rows_per_agent=3)
MAX = 1 << 20


def test_version_zero_is_an_empty_bank_standing_for_no_example() -> None:
    bank, examples = decode_bank_version(empty_bank_version(SPEC), SPEC, max_bytes=MAX)
    assert bank.shape == (0, 4) and bank.dtype == np.float32 and examples == 0


def test_a_version_round_trips() -> None:
    rows = np.arange(8, dtype=np.float64).reshape(2, 4)
    bank, examples = decode_bank_version(encode_bank_version(rows, 7), SPEC, max_bytes=MAX)
    np.testing.assert_array_equal(bank, rows.astype(np.float32))
    assert examples == 7


def test_an_upload_of_half_precision_rows_is_read_as_float32() -> None:
    rows = np.ones((2, 4), np.float16)
    bank = decode_bank_upload(encode_layers({"bank": rows}), SPEC, max_bytes=MAX)
    assert bank.dtype == np.float32 and bank.shape == (2, 4)


@pytest.mark.parametrize(("tensors", "reason", "words"), [
    ({"bank": np.ones((2, 5), np.float32)}, "bad_shape", "rows x 4"),
    ({"bank": np.ones(4, np.float32)}, "bad_shape", "rows x 4"),
    ({"bank": np.ones((0, 4), np.float32)}, "bad_shape", "1 to 3"),
    ({"bank": np.ones((4, 4), np.float32)}, "too_large", "1 to 3"),
    ({"bank": np.array([[np.nan, 0, 0, 0]], np.float32)}, "not_finite", "NaN"),
    ({"bank": np.ones((1, 4), np.float32), "extra": np.ones(1, np.float32)}, "bad_layers", "one tensor"),
    ({"rows": np.ones((1, 4), np.float32)}, "bad_layers", "one tensor"),
    ({"bank": np.ones((1, 4), np.int32)}, "bad_dtype", "int32"),
])
def test_an_upload_that_is_not_a_bank_of_the_training_is_refused_with_the_reason(
        tensors: dict[str, np.ndarray], reason: str, words: str) -> None:
    with pytest.raises(InvalidTensor) as refused:
        decode_bank_upload(encode_layers(tensors), SPEC, max_bytes=MAX)
    assert refused.value.reason == reason and words in refused.value.detail


def test_a_bank_training_defaults_to_its_rule_and_no_privacy_and_round_trips() -> None:
    config = TrainingConfig.model_validate({"dataset": "d", "model": {"kind": "memory_bank", "feature_dim": 8}})
    assert (config.kind, config.algorithm, config.privacy_level) == ("memory_bank", "memory_bank", "none")
    assert TrainingConfig.model_validate_json(config.model_dump_json()) == config


def test_the_bank_rule_needs_a_bank_model() -> None:
    with pytest.raises(ValidationError, match="needs a model"):
        TrainingConfig.model_validate({"dataset": "d", "algorithm": "memory_bank",
                                       "model": {"trainer": "softmax", "num_features": 4, "num_classes": 2}})
