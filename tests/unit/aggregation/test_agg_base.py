import numpy as np
import pytest

from federated_learning.aggregation import allocate_slabs, create_strategy

GLOBAL = [np.zeros((2, 3), dtype=np.float32), np.zeros(4, dtype=np.float64)]


def test_allocate_slabs_gives_one_contiguous_slab_per_layer():
    slabs = allocate_slabs(GLOBAL, 5)

    assert [s.shape for s in slabs] == [(5, 6), (5, 4)]
    assert [s.dtype for s in slabs] == [np.float32, np.float64]
    assert all(s.flags.c_contiguous for s in slabs)


def test_allocate_slabs_rejects_zero_clients():
    with pytest.raises(ValueError, match="num_clients must be >= 1; got 0"):
        allocate_slabs(GLOBAL, 0)


def test_slab_of_wrong_width_is_rejected():
    slabs = [np.zeros((3, 6), np.float32), np.zeros((3, 5))]

    with pytest.raises(ValueError, match="slab 1 holds rows of 5 values; global layer 1 has 4"):
        create_strategy("fedavg").aggregate_slabs(GLOBAL, slabs, [1, 1, 1])


def test_slabs_with_different_client_counts_are_rejected():
    slabs = [np.zeros((3, 6), np.float32), np.zeros((2, 4))]

    with pytest.raises(ValueError, match="slab 1 has 2 rows; slab 0 has 3"):
        create_strategy("fedavg").aggregate_slabs(GLOBAL, slabs, [1, 1, 1])


def test_non_contiguous_slab_is_rejected():
    slabs = [np.zeros((6, 3), np.float32).T, np.zeros((3, 4))]

    with pytest.raises(ValueError, match="slab 0 must be C-contiguous"):
        create_strategy("fedavg").aggregate_slabs(GLOBAL, slabs, [1, 1, 1])


def test_unaligned_slab_is_rejected():
    raw = np.zeros(3 * 6 * 4 + 1, np.uint8)
    unaligned = np.frombuffer(raw, np.float32, count=18, offset=1).reshape(3, 6)
    slabs = [unaligned, np.zeros((3, 4))]

    with pytest.raises(ValueError, match="slab 0 must be aligned to its float32 items"):
        create_strategy("fedavg").aggregate_slabs(GLOBAL, slabs, [1, 1, 1])


def test_integer_slab_is_rejected():
    slabs = [np.zeros((3, 6), np.int32), np.zeros((3, 4))]

    with pytest.raises(ValueError, match="slab 0 has dtype int32"):
        create_strategy("fedavg").aggregate_slabs(GLOBAL, slabs, [1, 1, 1])


def test_slab_count_must_match_layer_count():
    with pytest.raises(ValueError, match="got 1 slabs for a model of 2 layers"):
        create_strategy("fedavg").aggregate_slabs(GLOBAL, [np.zeros((3, 6), np.float32)], [1, 1, 1])


def test_negative_staleness_is_rejected():
    slabs = allocate_slabs(GLOBAL, 2)
    for s in slabs:
        s.fill(0)

    with pytest.raises(ValueError, match="client 1 staleness must be >= 0; got -1"):
        create_strategy("fedavg").aggregate_slabs(GLOBAL, slabs, [1, 1], staleness=[0, -1])


def test_stateless_rule_has_empty_state_and_refuses_foreign_state():
    strategy = create_strategy("median")

    assert strategy.state_dict() == {}
    with pytest.raises(ValueError, match="median keeps no state"):
        strategy.load_state_dict({"m.0": np.zeros(3, np.float32)})


def test_outputs_of_one_dtype_are_views_of_one_buffer():
    from federated_learning.aggregation.base import output_buffer, outputs_like

    layers = [np.zeros((2, 3), np.float32), np.zeros(5, np.float16), np.zeros(1, np.float32)]
    outputs = outputs_like(layers)

    assert [(o.shape, o.dtype) for o in outputs] == [((6,), np.float32), ((5,), np.float32), ((1,), np.float32)]
    buffer = output_buffer(outputs)
    assert buffer.size == 12 and all(np.shares_memory(o, buffer) for o in outputs)
    for value, out in enumerate(outputs):
        out[:] = value
    assert buffer.tolist() == [0.0] * 6 + [1.0] * 5 + [2.0]


def test_outputs_of_mixed_dtypes_are_separate_and_the_largest_is_the_scratch():
    from federated_learning.aggregation.base import output_buffer, outputs_like

    outputs = outputs_like(GLOBAL)

    assert [o.dtype for o in outputs] == [np.float32, np.float64]
    assert not np.shares_memory(outputs[0], outputs[1])
    assert output_buffer(outputs) is outputs[1]  # 4 float64 (32 bytes) against 6 float32 (24)
