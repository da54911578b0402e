"""Sparsification, stochastic quantization, error feedback and the tensor encoding."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load, save

from federated_learning.privacy.compression import (
    CompressedUpdate,
    CompressionMethod,
    ErrorFeedback,
    Quantizer,
    decompress,
    keep_count,
    quantize,
    random_k,
    top_k,
)


def _layers(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(30, 40)).astype(np.float32), rng.normal(size=7).astype(np.float32)]


def test_top_k_keeps_the_largest_magnitudes() -> None:
    layers = [np.array([0.1, -5.0, 0.2], dtype=np.float32), np.array([[3.0, -0.3]], np.float32)]

    compressed = top_k(layers, 2)

    restored = decompress(compressed)
    np.testing.assert_array_equal(restored[0], [0.0, -5.0, 0.0])
    np.testing.assert_array_equal(restored[1], [[3.0, 0.0]])
    np.testing.assert_array_equal(compressed.arrays["indices"], np.array([1, 3], np.uint32))


def test_top_k_with_all_values_is_lossless() -> None:
    layers = _layers()

    restored = decompress(top_k(layers, 1207))

    for original, back in zip(layers, restored, strict=True):
        np.testing.assert_array_equal(original, back)


def test_random_k_keeps_k_original_values() -> None:
    layers = _layers()
    flat = np.concatenate([layer.ravel() for layer in layers])

    compressed = random_k(layers, 100, np.random.default_rng(1))

    indices = compressed.arrays["indices"]
    assert len(set(indices.tolist())) == 100
    np.testing.assert_array_equal(compressed.arrays["values"], flat[indices])


def test_unbiased_random_k_is_unbiased() -> None:
    layers = [np.linspace(-1, 1, 20, dtype=np.float32)]
    rng = np.random.default_rng(2)

    mean = np.mean([decompress(random_k(layers, 5, rng, unbiased=True))[0]
                    for _ in range(4000)], axis=0)

    np.testing.assert_allclose(mean, layers[0], atol=0.1)


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_quantization_is_unbiased(bits: int) -> None:
    layers = [np.random.default_rng(3).normal(size=300).astype(np.float32)]
    rng = np.random.default_rng(4)
    draws = 3000

    decoded = np.array([decompress(quantize(layers, bits, rng, block_size=64))[0]
                        for _ in range(draws)])

    step = np.repeat(quantize(layers, bits, rng, block_size=64).arrays["step"], 64)[:300]
    max_std_of_mean = (step / 2) / np.sqrt(draws)
    assert np.all(np.abs(decoded.mean(axis=0) - layers[0]) < 5 * max_std_of_mean)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_within_one_step(bits: int) -> None:
    layers = _layers()
    compressed = quantize(layers, bits, np.random.default_rng(5), block_size=128)

    restored = decompress(compressed)

    flat = np.concatenate([layer.ravel() for layer in layers])
    back = np.concatenate([layer.ravel() for layer in restored])
    step = np.repeat(compressed.arrays["step"], 128)[: flat.size]
    assert np.all(np.abs(back - flat) <= step * (1 + 1e-5))
    assert [layer.shape for layer in restored] == [(30, 40), (7,)]


def test_constant_block_quantizes_exactly() -> None:
    layers = [np.full(10, 0.75, dtype=np.float32)]

    restored = decompress(quantize(layers, 4, np.random.default_rng(0)))

    np.testing.assert_array_equal(restored[0], layers[0])


def test_ratios_and_bytes_saved_count_the_payload() -> None:
    layers = [np.zeros(4096, dtype=np.float32)]
    rng = np.random.default_rng(0)

    q8 = quantize(layers, 8, rng, block_size=1024)
    q4 = quantize(layers, 4, rng, block_size=1024)
    sparse = top_k(layers, 41)

    assert q8.nbytes == 4096 + 4 * 8 and q4.nbytes == 2048 + 4 * 8
    assert q8.get_ratio() == pytest.approx(16384 / 4128)
    assert q4.get_ratio() == pytest.approx(16384 / 2080)
    assert sparse.nbytes == 41 * 8 and sparse.bytes_saved() == 16384 - 328
    assert sparse.dense_nbytes == 16384


def test_four_bit_codes_pack_two_per_byte_with_odd_length() -> None:
    layers = [np.arange(9, dtype=np.float32)]

    compressed = quantize(layers, 4, np.random.default_rng(0), block_size=16)

    assert compressed.arrays["codes"].dtype == np.uint8
    assert compressed.arrays["codes"].size == 5
    np.testing.assert_allclose(decompress(compressed)[0], layers[0], atol=9 / 15 + 1e-6)


@pytest.mark.parametrize("method", list(CompressionMethod))
def test_encoding_round_trips_through_safetensors(method: CompressionMethod) -> None:
    layers = _layers()
    rng = np.random.default_rng(6)
    compressed = {
        CompressionMethod.TOP_K: lambda: top_k(layers, 50),
        CompressionMethod.RANDOM_K: lambda: random_k(layers, 50, rng),
        CompressionMethod.QUANTIZE_8: lambda: quantize(layers, 8, rng),
        CompressionMethod.QUANTIZE_4: lambda: quantize(layers, 4, rng),
    }[method]()

    restored = CompressedUpdate.from_tensors(load(save(compressed.to_tensors())))

    assert restored.method == method and restored.shapes == ((30, 40), (7,))
    for a, b in zip(decompress(compressed), decompress(restored), strict=True):
        np.testing.assert_array_equal(a, b)


def test_error_feedback_keeps_what_compression_dropped() -> None:
    feedback = ErrorFeedback()
    update = [np.array([1.0, 0.5, 0.25, 0.1], dtype=np.float32)]

    first = feedback.compress("agent-1", update, lambda layers: top_k(layers, 1))

    np.testing.assert_array_equal(decompress(first)[0], [1.0, 0, 0, 0])
    assert feedback.residual("agent-1") == pytest.approx([0.0, 0.5, 0.25, 0.1])
    second = feedback.compress("agent-1", update, lambda layers: top_k(layers, 1))
    np.testing.assert_array_equal(decompress(second)[0], [1.0, 0, 0, 0])
    assert feedback.residual("agent-1") == pytest.approx([0.0, 1.0, 0.5, 0.2])
    third = feedback.compress("agent-1", update, lambda layers: top_k(layers, 1))
    np.testing.assert_array_equal(decompress(third)[0], [0, 1.5, 0, 0])
    assert feedback.residual("agent-2") is None


def test_error_feedback_loses_nothing_over_rounds() -> None:
    feedback = ErrorFeedback()
    rng = np.random.default_rng(8)
    updates = [[rng.normal(size=200).astype(np.float32)] for _ in range(30)]

    sent = [decompress(feedback.compress("a", u, lambda layers: top_k(layers, 10)))[0]
            for u in updates]

    residual = feedback.residual("a")
    assert residual is not None
    np.testing.assert_allclose(np.sum(sent, axis=0) + residual,
                               np.sum([u[0] for u in updates], axis=0), atol=1e-4)


def test_error_feedback_refuses_a_shape_change_until_reset() -> None:
    feedback = ErrorFeedback()
    feedback.compress("a", [np.ones(4, np.float32)], lambda layers: top_k(layers, 1))

    with pytest.raises(ValueError, match="residual has 4"):
        feedback.compress("a", [np.ones(5, np.float32)], lambda layers: top_k(layers, 1))
    feedback.reset("a")
    feedback.compress("a", [np.ones(5, np.float32)], lambda layers: top_k(layers, 1))


def test_keep_count_and_bad_parameters() -> None:
    assert keep_count(1000, 0.01) == 10
    assert keep_count(10, 0.001) == 1
    with pytest.raises(ValueError, match="kept fraction must be in \\(0, 1\\]; got 1.5"):
        keep_count(10, 1.5)
    with pytest.raises(ValueError, match="k must be in \\[1, 1207\\]; got 0"):
        top_k(_layers(), 0)
    with pytest.raises(ValueError, match="bits must be 8 or 4; got 2"):
        quantize(_layers(), 2, np.random.default_rng(0))


def _numpy_decompress(compressed: CompressedUpdate) -> np.ndarray:
    """The NumPy reference of quantized decompression: minimum + code * step per block, in float64."""
    codes = np.asarray(compressed.arrays["codes"], np.uint8)
    if compressed.method == CompressionMethod.QUANTIZE_4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=1).ravel()
    block = np.arange(compressed.size) // compressed.block_size
    minimum = compressed.arrays["minimum"].astype(np.float64)[block]
    return (minimum + codes[: compressed.size] * compressed.arrays["step"].astype(np.float64)[block]).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("size", [1, 63, 64, 65, 1001])
def test_quantized_decompression_kernels_equal_the_numpy_reference_bit_for_bit(bits: int, size: int) -> None:
    from federated_learning.privacy.compression import decompress_onto

    rng = np.random.default_rng(size)
    layers = [(10 * rng.normal(size=size)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)]
    compressed = quantize(layers, bits, rng, block_size=64)
    bases = [rng.normal(size=layer.shape).astype(np.float32) for layer in layers]
    expected = _numpy_decompress(compressed)

    delta = np.concatenate([layer.ravel() for layer in decompress(compressed)])
    moved = decompress_onto(compressed, bases)

    np.testing.assert_array_equal(delta.view(np.uint32), expected.view(np.uint32))
    offset = 0
    for base, layer in zip(bases, moved, strict=True):
        reference = (base.astype(np.float64) + expected[offset:offset + base.size].reshape(base.shape)).astype(np.float32)
        np.testing.assert_array_equal(layer.view(np.uint32), reference.view(np.uint32))
        offset += base.size


def test_decompressing_onto_half_precision_bases_adds_in_float64() -> None:
    from federated_learning.privacy.compression import decompress_onto

    rng = np.random.default_rng(0)
    compressed = quantize([rng.normal(size=10).astype(np.float32)], 8, rng)
    base = rng.normal(size=10).astype(np.float16)

    [moved] = decompress_onto(compressed, [base])

    assert moved.dtype == np.float16
    np.testing.assert_array_equal(moved, (base.astype(np.float64) + _numpy_decompress(compressed)).astype(np.float16))


@pytest.mark.parametrize("extra", [1, -1])
def test_a_quantized_update_with_more_or_fewer_codes_than_values_is_refused(extra: int) -> None:
    rng = np.random.default_rng(0)
    compressed = quantize([rng.normal(size=100).astype(np.float32)], 8, rng)
    codes = np.resize(compressed.arrays["codes"], 100 + extra)
    tampered = CompressedUpdate(compressed.method, compressed.shapes, {**compressed.arrays, "codes": codes},
                                compressed.block_size)

    with pytest.raises(ValueError, match="needs 100 uint8 code bytes"):
        decompress(tampered)


def _splitmix_draws(seed: int, count: int) -> np.ndarray:
    """The NumPy reference of the per-value draws: the top 31 bits of SplitMix64's outputs 1..count
    from state ``seed`` (uint64 arithmetic wraps)."""
    return _splitmix_draws_at(seed, np.arange(count, dtype=np.uint64))


def _splitmix_draws_at(seed: int, indices: np.ndarray) -> np.ndarray:
    z = np.uint64(seed) + (indices + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) >> np.uint64(33)


def test_the_per_value_draws_are_splitmix64_and_look_uniform() -> None:
    from federated_learning.privacy.quantization_kernels import draw

    seed = 0x0123456789ABCDEF
    draws = _splitmix_draws(seed, 200_000)
    assert [int(draw(np.uint64(seed), j)) for j in range(5)] == [int(d) for d in draws[:5]]
    far = [2**32 + 7, 2**40 + 3]  # the index times the gamma wraps around 2**64
    assert [int(draw(np.uint64(seed), j)) for j in far] == [
        int(d) for d in _splitmix_draws_at(seed, np.array(far, np.uint64))]
    # SplitMix64 from state 0: its published first output is 0xE220A8397B1DCDAF.
    assert int(_splitmix_draws(0, 1)[0]) == 0xE220A8397B1DCDAF >> 33
    fractions = draws / 2.0**31
    assert abs(fractions.mean() - 0.5) < 0.005 and abs(fractions.var() - 1 / 12) < 0.002
    counts = np.bincount((fractions * 16).astype(int), minlength=16)
    chi2 = float((((counts - draws.size / 16) ** 2) / (draws.size / 16)).sum())
    assert chi2 < 40  # 15 degrees of freedom: 40 is beyond p = 0.0005
    assert abs(np.corrcoef(fractions[:-1], fractions[1:])[0, 1]) < 0.01


def test_a_quantized_update_may_not_declare_a_block_the_server_would_have_to_allocate() -> None:
    update = quantize([np.ones(10, np.float32)], 8, np.random.default_rng(0), block_size=16)
    huge = CompressedUpdate(update.method, update.shapes, dict(update.arrays), 1 << 34)
    with pytest.raises(ValueError, match="block_size"):
        decompress(huge)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size", [1, 64, 1000])
def test_quantized_codes_equal_the_numpy_reference(bits: int, block_size: int) -> None:
    """floor(t) + (u < frac(t) * 2**31), at most the top level, with t = (x - minimum) / step per
    block and u value i's SplitMix64 draw from the update's seed, the generator's first uint64."""
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.normal(size=5_001), np.zeros(block_size), [3.0] * 7]).astype(np.float32)
    compressed = quantize([x], bits, np.random.default_rng(4), block_size)

    seed = int(np.random.default_rng(4).integers(0, 1 << 64, dtype=np.uint64))
    uniforms = _splitmix_draws(seed, x.size).astype(np.float64)
    block = np.arange(x.size) // block_size
    minimum = compressed.arrays["minimum"].astype(np.float64)[block]
    step = compressed.arrays["step"].astype(np.float64)[block]
    scaled = (x.astype(np.float64) - minimum) / np.where(step > 0, step, 1.0)
    lower = np.floor(scaled)
    expected = np.minimum(lower + (uniforms < (scaled - lower) * 2.0**31), 2**bits - 1).astype(np.uint8)
    codes = np.asarray(compressed.arrays["codes"])
    if bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=1).ravel()[: x.size]
    np.testing.assert_array_equal(codes, expected)
    assert (lower <= 2**bits - 1).all() and ((scaled >= 0) | (step == 0)).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_error_feedback_takes_a_quantizers_residual_from_the_same_pass(bits: int) -> None:
    """The residual the quantizing pass writes is the one decoding would give, bit for bit."""
    rng = np.random.default_rng(2)
    updates = [[rng.normal(size=(50, 40)).astype(np.float32), rng.normal(size=33).astype(np.float32)]
               for _ in range(3)]
    fused, decoded = ErrorFeedback(), ErrorFeedback()
    for update in updates:
        sent = fused.compress("a", update, Quantizer(bits, np.random.default_rng(9)))
        again = decoded.compress("a", update, lambda layers: quantize(layers, bits, np.random.default_rng(9)))
        for name in ("codes", "minimum", "step"):
            np.testing.assert_array_equal(sent.arrays[name], again.arrays[name])
        fused_residual, decoded_residual = fused.residual("a"), decoded.residual("a")
        assert fused_residual is not None and decoded_residual is not None
        np.testing.assert_array_equal(fused_residual.view(np.uint32), decoded_residual.view(np.uint32))


def test_quantizing_an_empty_update_and_a_non_finite_one() -> None:
    empty = quantize([np.zeros(0, np.float32)], 8, np.random.default_rng(0))
    assert empty.arrays["codes"].size == 0 and empty.arrays["minimum"].size == 0
    assert decompress(empty)[0].size == 0
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            quantize([np.array([1.0, bad, 2.0], np.float32)], 8, np.random.default_rng(0), block_size=2)


def test_half_precision_layers_quantize_as_their_float64_values() -> None:
    layer = np.random.default_rng(0).normal(size=300).astype(np.float16)
    half = quantize([layer], 8, np.random.default_rng(1), block_size=64)
    wide = quantize([layer.astype(np.float64)], 8, np.random.default_rng(1), block_size=64)
    for name in ("codes", "minimum", "step"):
        np.testing.assert_array_equal(half.arrays[name], wide.arrays[name])
