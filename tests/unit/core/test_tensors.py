import numpy as np
import pytest

from federated_learning.protocol.tensors import (
    InvalidTensor,
    decode_layers,
    digest_of,
    encode_layers,
    spec_of,
    validate_layers,
)

MODEL = {"dense.weight": np.ones((3, 2), np.float32), "dense.bias": np.zeros(2, np.float32)}


def test_round_trip_keeps_values_and_layer_order() -> None:
    decoded = decode_layers(encode_layers(MODEL), max_bytes=1 << 20)
    assert list(decoded) == ["dense.weight", "dense.bias"]
    np.testing.assert_array_equal(decoded["dense.weight"], MODEL["dense.weight"])


def test_same_layers_give_same_digest() -> None:
    assert digest_of(encode_layers(MODEL)) == digest_of(encode_layers(dict(MODEL)))


def test_oversized_blob_is_rejected() -> None:
    with pytest.raises(InvalidTensor) as info:
        decode_layers(encode_layers(MODEL), max_bytes=10)
    assert info.value.reason == "too_large"


def test_garbage_is_not_a_blob() -> None:
    with pytest.raises(InvalidTensor) as info:
        decode_layers(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}xxxxxx", max_bytes=1 << 20)
    assert info.value.reason == "bad_blob"


def test_integer_dtype_is_rejected() -> None:
    with pytest.raises(InvalidTensor) as info:
        decode_layers(encode_layers({"w": np.ones(3, np.int32)}), max_bytes=1 << 20)
    assert info.value.reason == "bad_dtype"


@pytest.mark.parametrize(("layers", "reason"), [
    ({"dense.weight": np.ones((2, 3), np.float32), "dense.bias": np.zeros(2, np.float32)}, "bad_shape"),
    ({"dense.weight": np.ones((3, 2), np.float64), "dense.bias": np.zeros(2, np.float32)}, "bad_dtype"),
    ({"dense.weight": np.full((3, 2), np.nan, np.float32), "dense.bias": np.zeros(2, np.float32)}, "not_finite"),
    ({"dense.weight": np.ones((3, 2), np.float32)}, "bad_layers"),
])
def test_layers_that_do_not_fit_the_model_are_rejected(layers: dict[str, np.ndarray], reason: str) -> None:
    with pytest.raises(InvalidTensor) as info:
        validate_layers(layers, spec_of(MODEL))
    assert info.value.reason == reason
