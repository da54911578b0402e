import json
import math

import numpy as np
import pytest

from federated_learning.versioning.compare import CHUNK_ELEMENTS, compare_versions


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_identical_versions_have_distance_zero_and_cosine_one() -> None:
    a = {"w": arr(1, 2, 3), "b": arr(4)}
    result = compare_versions(a, {k: v.copy() for k, v in a.items()})
    assert result.l2_distance == 0.0 and result.relative_distance == 0.0
    assert result.cosine_similarity == pytest.approx(1.0)
    assert [layer.cosine_similarity for layer in result.layers] == pytest.approx([1.0, 1.0])


def test_orthogonal_layers_have_cosine_zero() -> None:
    result = compare_versions({"w": arr(1, 0)}, {"w": arr(0, 1)})
    assert result.cosine_similarity == 0.0
    assert result.l2_distance == pytest.approx(math.sqrt(2))
    assert result.relative_distance == pytest.approx(math.sqrt(2))


def test_opposite_layers_have_cosine_minus_one() -> None:
    result = compare_versions({"w": arr(3, 4)}, {"w": arr(-3, -4)})
    assert result.cosine_similarity == pytest.approx(-1.0)
    assert result.l2_distance == pytest.approx(10.0)
    assert result.relative_distance == pytest.approx(2.0)


def test_zero_vectors_follow_the_documented_convention() -> None:
    both_zero = compare_versions({"w": arr(0, 0)}, {"w": arr(0, 0)})
    one_zero = compare_versions({"w": arr(0, 0)}, {"w": arr(3, 4)})
    assert (both_zero.cosine_similarity, both_zero.relative_distance) == (1.0, 0.0)
    assert (one_zero.cosine_similarity, one_zero.relative_distance, one_zero.l2_distance) == (0.0, 1.0, 5.0)


def test_overall_figures_treat_all_layers_as_one_vector() -> None:
    result = compare_versions({"w": arr(1, 0), "b": arr(0)}, {"w": arr(1, 0), "b": arr(1)})
    assert [layer.name for layer in result.layers] == ["w", "b"]
    assert [layer.cosine_similarity for layer in result.layers] == [1.0, 0.0]
    assert result.l2_distance == pytest.approx(1.0)
    assert result.cosine_similarity == pytest.approx(1 / math.sqrt(2))


def test_metric_deltas_are_b_minus_a_for_shared_keys() -> None:
    result = compare_versions({"w": arr(1)}, {"w": arr(1)}, {"accuracy": 0.5, "loss": 2.0, "only_a": 1.0},
                              {"accuracy": 0.75, "loss": 1.5})
    assert result.metric_deltas == {"accuracy": 0.25, "loss": -0.5}


def test_different_layer_names_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"only in a \['x'\], only in b \['y'\]"):
        compare_versions({"x": arr(1)}, {"y": arr(1)})


def test_different_layer_shapes_are_rejected_naming_the_layer() -> None:
    with pytest.raises(ValueError, match="layer 'w' has shape"):
        compare_versions({"w": np.zeros((2, 3), np.float32)}, {"w": np.zeros((3, 2), np.float32)})


def test_non_finite_layer_is_rejected() -> None:
    with pytest.raises(ValueError, match="layer 'w' holds NaN"):
        compare_versions({"w": arr(1, np.nan)}, {"w": arr(1, 2)})


def test_chunked_float64_sums_match_a_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=2 * CHUNK_ELEMENTS + 17).astype(np.float32)
    b = rng.normal(size=a.size).astype(np.float32)
    x, y = a.astype(np.float64), b.astype(np.float64)
    result = compare_versions({"w": a}, {"w": b})
    assert result.l2_distance == pytest.approx(np.linalg.norm(x - y), rel=1e-12)
    assert result.cosine_similarity == pytest.approx(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), rel=1e-9)


def test_comparison_serialises_to_json() -> None:
    data = compare_versions({"w": np.ones((2, 2), np.float32)}, {"w": np.zeros((2, 2), np.float32)}).to_dict()
    assert json.loads(json.dumps(data))["layers"][0]["shape"] == [2, 2]
