import json

import ml_dtypes
import numpy as np
import pytest

from federated_learning.privacy.compression import CompressedUpdate, CompressionMethod, quantize
from federated_learning.protocol.tensors import (
    InvalidTensor,
    decode_layers,
    digest_of,
    encode_layers,
    header_bytes_needed,
    read_layout,
    spec_of,
    validate_layers,
)
from federated_learning.protocol.updates import check_update, check_update_layout, encode_compressed

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


def test_every_model_dtype_round_trips_bit_for_bit() -> None:
    layers = {
        "half": np.array([1.5, -2.25, 65504.0], np.float16),
        "brain": np.array([1.0, -3.0078125, 1e30], ml_dtypes.bfloat16),
        "single": np.arange(6, dtype=np.float32).reshape(2, 3),
        "double": np.array([np.pi], np.float64),
        "counter": np.array(7, np.int64),
        "mask": np.array([True, False]),
    }
    decoded = decode_layers(encode_layers(layers), max_bytes=1 << 20)
    assert list(decoded) == list(layers)
    for name, layer in layers.items():
        assert decoded[name].dtype == layer.dtype and decoded[name].shape == layer.shape
        assert decoded[name].tobytes() == layer.tobytes()


def test_a_dtype_outside_the_allowed_set_is_rejected() -> None:
    with pytest.raises(InvalidTensor) as info:
        decode_layers(encode_layers({"w": np.ones(3, np.int32)}), max_bytes=1 << 20,
                      allowed_dtypes=frozenset({"float32"}))
    assert info.value.reason == "bad_dtype"


def _blob(header: dict[str, object], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


@pytest.mark.parametrize("header", [
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},    # size does not match the shape
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},    # a gap before the tensor
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},    # bytes after the last tensor
    {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},    # unknown dtype
    {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}},   # negative dimension
])
def test_malformed_tensor_descriptions_are_rejected(header: dict[str, object]) -> None:
    with pytest.raises(InvalidTensor):
        decode_layers(_blob(header, bytes(8)), max_bytes=1 << 20)


def test_without_an_order_entry_layers_come_in_data_order() -> None:
    header = {"b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    for _ in range(5):
        assert list(decode_layers(_blob(header, bytes(8)), max_bytes=1 << 20)) == ["b", "a"]


def test_a_layout_mismatch_names_the_layer_and_both_layouts() -> None:
    with pytest.raises(InvalidTensor) as info:
        validate_layers({"dense.weight": np.ones((2, 3), np.float32), "dense.bias": np.zeros(2, np.float32)},
                        spec_of(MODEL))
    assert str(info.value) == "bad_shape: layer 'dense.weight': expected (3, 2) float32, received (2, 3) float32"


def test_integer_layers_are_not_checked_for_finiteness() -> None:
    validate_layers({"n": np.array(3, np.int64)}, {"n": ((), "int64")})


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


@pytest.mark.parametrize("header", [
    {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}},         # past the end of the blob
    {"w": {"dtype": "F32", "shape": [1] * 40, "data_offsets": [0, 4]}},        # too many dimensions
    {"w": {"dtype": "F32", "shape": [0, 2 ** 62, 2 ** 62], "data_offsets": [0, 0]},
     "v": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},             # an impossible empty shape
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},             # offsets backwards
])
def test_hostile_headers_are_refused_as_bad_blobs(header: dict[str, object]) -> None:
    with pytest.raises(InvalidTensor) as info:
        decode_layers(_blob(header, bytes(8)), max_bytes=1 << 20)
    assert info.value.reason == "bad_blob"


def test_a_deeply_nested_header_is_a_bad_blob() -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidTensor):
        decode_layers(len(nested).to_bytes(8, "little") + nested, max_bytes=1 << 21)


def test_empty_tensors_are_read_whatever_the_header_order() -> None:
    a = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    b = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    z = {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}
    first = decode_layers(_blob({"a": a, "b": b, "z": z}, bytes(4)), max_bytes=1 << 20)
    second = decode_layers(_blob({"z": z, "b": b, "a": a}, bytes(4)), max_bytes=1 << 20)
    assert list(first) == list(second) == ["a", "b", "z"]


# -- what a header alone tells (the coordinator's check of an upload) ---------------------------

HOSTILE_OR_MALFORMED = [
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
    {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}},
    {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}},
    {"w": {"dtype": "F32", "shape": [1] * 40, "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
]


@pytest.mark.parametrize("header", HOSTILE_OR_MALFORMED)
def test_the_header_alone_refuses_what_decoding_refuses_for_the_same_reason(header: dict[str, object]) -> None:
    blob = _blob(header, bytes(8))
    with pytest.raises(InvalidTensor) as whole:
        decode_layers(blob, max_bytes=1 << 20)
    with pytest.raises(InvalidTensor) as head:
        read_layout(blob[:header_bytes_needed(blob)], len(blob), max_bytes=1 << 20)
    assert head.value.reason == whole.value.reason


def test_the_header_alone_gives_the_layout_in_saved_order_without_reading_the_values() -> None:
    model = {"z.bias": np.zeros(3, np.float32), "a.weight": np.ones((2, 3), ml_dtypes.bfloat16),
             "steps": np.array(7, np.int64)}
    blob = encode_layers(model)
    head = blob[:header_bytes_needed(blob)]
    layout, metadata = read_layout(head, len(blob), max_bytes=1 << 20)
    assert layout == spec_of(decode_layers(blob, max_bytes=1 << 20)) == spec_of(model)
    assert list(layout) == list(model) and "order" in metadata
    with pytest.raises(InvalidTensor) as info:
        read_layout(head, len(blob), max_bytes=len(blob) - 1)
    assert info.value.reason == "too_large"
    with pytest.raises(InvalidTensor):  # a blob cut short: its data no longer tiles
        read_layout(head, len(blob) - 4, max_bytes=1 << 20)


def test_a_header_check_of_an_update_refuses_the_layout_and_leaves_the_values_to_the_aggregator() -> None:
    spec = spec_of(MODEL)
    nan = {"dense.weight": np.full((3, 2), np.nan, np.float32), "dense.bias": np.zeros(2, np.float32)}
    blob = encode_layers(nan)
    check_update_layout(blob[:header_bytes_needed(blob)], len(blob), spec, max_bytes=1 << 20)  # values unread
    wrong = encode_layers({"dense.weight": np.ones((2, 3), np.float32), "dense.bias": np.zeros(2, np.float32)})
    with pytest.raises(InvalidTensor) as info:
        check_update_layout(wrong[:header_bytes_needed(wrong)], len(wrong), spec, max_bytes=1 << 20)
    assert info.value.reason == "bad_shape"


def test_reading_a_layout_needs_the_whole_header() -> None:
    blob = encode_layers(MODEL)
    with pytest.raises(ValueError, match="leading bytes"):
        read_layout(blob[:12], len(blob), max_bytes=1 << 20)


def test_a_compressed_update_is_checked_whole_without_being_expanded() -> None:
    spec = spec_of(MODEL)
    rng = np.random.default_rng(0)
    delta = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)]
    check_update(encode_compressed(quantize(delta, 8, rng)), spec, max_bytes=1 << 20)
    huge = CompressedUpdate(CompressionMethod.TOP_K, ((2**31, 2**31), (2,)),
                            {"indices": np.zeros(1, np.uint32), "values": np.ones(1, np.float32)})
    with pytest.raises(InvalidTensor) as info:
        check_update(encode_compressed(huge), spec, max_bytes=1 << 20)
    assert info.value.reason == "bad_shape"
    nan = CompressedUpdate(CompressionMethod.TOP_K, ((3, 2), (2,)),
                           {"indices": np.zeros(1, np.uint32), "values": np.full(1, np.nan, np.float32)})
    with pytest.raises(InvalidTensor) as info:
        check_update(encode_compressed(nan), spec, max_bytes=1 << 20)
    assert info.value.reason == "not_finite"
