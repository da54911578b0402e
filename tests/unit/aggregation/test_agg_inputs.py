import numpy as np
import pytest

from federated_learning.aggregation.inputs import (
    Rows,
    UpdateLayout,
    prepare_update,
    rebased,
    rows_for,
    squared_distance,
    squared_norm,
)
from federated_learning.privacy.compression import quantize
from federated_learning.protocol.tensors import InvalidTensor, encode_layers
from federated_learning.protocol.updates import decode_update, encode_compressed

BASE = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "steps": np.array(4, np.int64)}


def layout(rows: Rows = Rows.MODELS, **fields: object) -> UpdateLayout:
    return UpdateLayout(base=BASE, rows=rows, max_bytes=1 << 20, **fields)  # type: ignore[arg-type]


def test_a_dense_update_is_read_in_place_and_its_distance_from_the_base_measured() -> None:
    model = {"w": np.full((2, 3), 2.0, np.float32), "steps": np.array(9, np.int64)}
    data = encode_layers(model)

    update = prepare_update(data, layout(carried=("steps",)))

    [row] = update.rows
    np.testing.assert_array_equal(row, model["w"])
    assert not row.flags.owndata and not row.flags.writeable  # a view of the blob's bytes
    assert update.carried == {"steps": np.array(9)}
    assert update.norm == pytest.approx(np.linalg.norm(model["w"] - BASE["w"]))


@pytest.mark.parametrize(("kind", "sign"), [(Rows.DELTAS, 1.0), (Rows.GRADIENTS, -1.0)])
def test_delta_and_gradient_rows_are_the_difference_from_the_base(kind: Rows, sign: float) -> None:
    model = {"w": BASE["w"] + 1.5, "steps": BASE["steps"]}

    update = prepare_update(encode_layers(model), layout(kind))

    np.testing.assert_array_equal(update.rows[0], np.full((2, 3), sign * 1.5, np.float32))
    assert update.norm == pytest.approx(1.5 * np.sqrt(6))


def test_an_update_trained_from_an_older_model_is_moved_onto_the_base() -> None:
    own = {"w": BASE["w"] - 10, "steps": np.array(1, np.int64)}
    model = {"w": own["w"] + 0.5, "steps": np.array(3, np.int64)}

    update = prepare_update(encode_layers(model), layout(carried=("steps",)), own)

    np.testing.assert_array_equal(update.rows[0], BASE["w"] + 0.5)
    assert int(update.carried["steps"]) == 6


def test_a_compressed_update_becomes_the_base_plus_its_delta() -> None:
    rng = np.random.default_rng(0)
    data = encode_compressed(quantize([rng.normal(size=(2, 3)).astype(np.float32)], 8, rng))

    update = prepare_update(data, layout())

    np.testing.assert_array_equal(update.rows[0], decode_update(data, {"w": ((2, 3), "float32"),
                                                                        "steps": ((), "int64")},
                                                                max_bytes=1 << 20, base=BASE)["w"])


def test_central_dp_clips_the_update_to_its_bound() -> None:
    model = {"w": BASE["w"] + 3.0, "steps": BASE["steps"]}

    update = prepare_update(encode_layers(model), layout(clip_norm=1.0))

    assert update.norm == pytest.approx(1.0)


@pytest.mark.parametrize(("model", "reason"), [
    ({"w": np.full((2, 3), np.inf, np.float32), "steps": BASE["steps"]}, "not_finite"),
    ({"w": np.zeros((3, 2), np.float32), "steps": BASE["steps"]}, "bad_shape"),
    ({"w": np.zeros((2, 3), np.float16), "steps": BASE["steps"]}, "bad_dtype"),
    ({"steps": BASE["steps"], "w": np.zeros((2, 3), np.float32)}, "bad_layers"),
])
def test_an_update_that_does_not_fit_the_model_is_refused_with_the_reason(model: dict[str, np.ndarray],
                                                                           reason: str) -> None:
    with pytest.raises(InvalidTensor) as info:
        prepare_update(encode_layers(model), layout())
    assert info.value.reason == reason


def test_half_precision_layers_become_float32_rows() -> None:
    import ml_dtypes

    base = {"w": np.ones(4, np.float16), "b": np.zeros(2, ml_dtypes.bfloat16)}
    model = {"w": np.full(4, 1.5, np.float16), "b": np.full(2, 2.0, ml_dtypes.bfloat16)}

    update = prepare_update(encode_layers(model), UpdateLayout(base=base, rows=Rows.MODELS, max_bytes=1 << 20))

    assert [row.dtype for row in update.rows] == [np.float32, np.float32]
    assert update.norm == pytest.approx(np.sqrt(4 * 0.25 + 2 * 4.0))


def test_distance_kernels_agree_with_numpy() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=1001).astype(np.float32), rng.normal(size=1001).astype(np.float32)

    assert squared_distance(x, y) == pytest.approx(float(np.sum((x.astype(np.float64) - y) ** 2)), rel=1e-12)
    assert squared_norm(x.astype(np.float64)) == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)), rel=1e-12)


def test_rules_read_models_except_fedbuff_deltas_and_fedsgd_gradients() -> None:
    assert [rows_for(name) for name in ("fedavg", "fedbuff", "fedsgd")] == [Rows.MODELS, Rows.DELTAS, Rows.GRADIENTS]


def test_rebasing_carries_counters_and_keeps_bools() -> None:
    assert int(rebased(np.array(5), np.array(7), np.array(2))) == 10
    assert rebased(np.array(False), np.array(True), np.array(False)).dtype == np.bool_


def test_the_distance_is_left_out_where_the_job_will_not_be_scored() -> None:
    from federated_learning.monitoring.anomaly import ANOMALY_MAX_VALUES, scores_updates

    update = prepare_update(encode_layers({"w": BASE["w"] + 1.0, "steps": BASE["steps"]}),
                            layout(measure_norms=False))

    assert np.isnan(update.norm)
    np.testing.assert_array_equal(update.rows[0], BASE["w"] + 1.0)
    assert scores_updates(5, 10) and not scores_updates(4, 10)
    assert scores_updates(69, ANOMALY_MAX_VALUES // 69) and not scores_updates(69, ANOMALY_MAX_VALUES // 69 + 1)
