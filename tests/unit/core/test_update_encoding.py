import numpy as np
import pytest

from federated_learning.privacy.compression import (
    CompressedUpdate,
    CompressionMethod,
    quantize,
    top_k,
)
from federated_learning.protocol.tensors import InvalidTensor, encode_layers, spec_of
from federated_learning.protocol.updates import decode_update, encode_compressed, is_compressed

BASE = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
SPEC = spec_of(BASE)


def test_dense_update_decodes_to_itself() -> None:
    model = {"w": np.full((4, 3), 2, np.float32), "b": np.ones(3, np.float32)}
    decoded = decode_update(encode_layers(model), SPEC, max_bytes=1 << 20, base=BASE)
    np.testing.assert_array_equal(decoded["w"], model["w"])


def test_compressed_delta_is_added_to_the_base() -> None:
    delta = [np.zeros((4, 3), np.float32), np.array([0.0, 5.0, 0.0], np.float32)]
    blob = encode_compressed(top_k(delta, 1))
    assert is_compressed(blob) and not is_compressed(encode_layers(BASE))
    decoded = decode_update(blob, SPEC, max_bytes=1 << 20, base=BASE)
    np.testing.assert_array_equal(decoded["b"], [0.0, 5.0, 0.0])
    np.testing.assert_array_equal(decoded["w"], BASE["w"])


def test_quantized_delta_round_trips_within_one_step() -> None:
    rng = np.random.default_rng(0)
    delta = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    decoded = decode_update(encode_compressed(quantize(delta, 8, rng)), SPEC, max_bytes=1 << 20)
    np.testing.assert_allclose(decoded["w"], delta[0], atol=0.05)


def test_compressed_update_of_another_model_is_rejected() -> None:
    blob = encode_compressed(top_k([np.ones(5, np.float32)], 2))
    with pytest.raises(InvalidTensor) as info:
        decode_update(blob, SPEC, max_bytes=1 << 20)
    assert info.value.reason == "bad_shape"


def test_a_small_blob_declaring_a_huge_update_is_refused_before_anything_is_expanded() -> None:
    import resource

    from federated_learning.privacy.compression import CompressedUpdate, CompressionMethod

    huge = CompressedUpdate(CompressionMethod(int(top_k([np.ones(3, np.float32)], 1).method)),
                            ((100_000_000, 3),), {"indices": np.array([0], np.uint32),
                                                   "values": np.array([1.0], np.float32)})
    blob = encode_compressed(huge)
    assert len(blob) < 1000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidTensor) as info:
        decode_update(blob, SPEC, max_bytes=1 << 20)
    assert info.value.reason == "bad_shape" and "declares" in info.value.detail
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing 1.2 GB large


@pytest.mark.parametrize("block_size", [0, 1])
def test_a_quantized_update_with_inconsistent_blocks_is_refused(block_size: int) -> None:
    rng = np.random.default_rng(0)
    update = quantize([np.ones((4, 3), np.float32), np.ones(3, np.float32)], 8, rng)
    tensors = {**update.to_tensors(), "block_size": np.array([block_size], np.int64)}
    from safetensors.numpy import save

    blob = bytes(save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"encoding": "compressed"}))
    with pytest.raises(InvalidTensor) as info:
        decode_update(blob, SPEC, max_bytes=1 << 20)
    assert info.value.reason == "bad_blob"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("base_dtype", [np.float32, np.float16])
def test_a_quantized_delta_that_overflows_on_its_base_is_refused_as_not_finite(base_dtype: type, bits: int) -> None:
    """Finite codes, minimum and step can still overflow float32 (or float16) once applied: the
    expansion checks what it writes."""
    base = {"w": np.ones(8, base_dtype), "steps": np.array([4], np.int64)}
    top = np.array([0, 0, 0, 0, 0, 0, 0, 255], np.uint8) if bits == 8 else np.array([0, 0, 0, 0xF0], np.uint8)
    overflowing = CompressedUpdate(
        CompressionMethod.QUANTIZE_8 if bits == 8 else CompressionMethod.QUANTIZE_4, ((8,),),
        {"codes": top, "minimum": np.array([3e38], np.float32), "step": np.array([3e36 if bits == 8 else 3e37], np.float32)},
        8)
    data = encode_compressed(overflowing)

    with pytest.raises(InvalidTensor, match="layer 'w' contains NaN or Inf once the update is applied") as refused:
        decode_update(data, spec_of(base), max_bytes=1 << 20, base=base)
    assert refused.value.reason == "not_finite"
    fits = CompressedUpdate(overflowing.method, ((8,),), {
        "codes": top, "minimum": np.array([-1.0], np.float32), "step": np.array([0.01], np.float32)}, 8)
    model = decode_update(encode_compressed(fits), spec_of(base), max_bytes=1 << 20, base=base)
    np.testing.assert_allclose(model["w"].astype(np.float64), [0] * 7 + [0.01 * (2**bits - 1)], atol=1e-3)


def test_bytes_whose_values_were_checked_are_compared_by_layout_only() -> None:
    """The aggregator's read-ahead checks each dense upload whole; the job decoding the same bytes
    compares their layout again but does not scan the values a second time."""
    base = {"w": np.zeros(4, np.float32)}
    nan = encode_layers({"w": np.array([0, np.nan, 0, 0], np.float32)})
    with pytest.raises(InvalidTensor, match="not_finite"):
        decode_update(nan, spec_of(base), max_bytes=1 << 20)

    assert np.isnan(decode_update(nan, spec_of(base), max_bytes=1 << 20, values_checked=True)["w"][1])
    wrong = encode_layers({"w": np.zeros(5, np.float32)})
    with pytest.raises(InvalidTensor, match="bad_shape"):
        decode_update(wrong, spec_of(base), max_bytes=1 << 20, values_checked=True)
