import tracemalloc

import numba
import numpy as np
import pytest

from federated_learning.aggregation import allocate_slabs, create_strategy, fill_slabs
from federated_learning.aggregation.fedavg import fedavg

CLIENTS = [
    [np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)],
    [np.array([2.0, 0.0, 1.0, 8.0], dtype=np.float32)],
    [np.array([4.0, 4.0, 2.0, 0.0], dtype=np.float32)],
]
GLOBAL = [np.zeros(4, dtype=np.float32)]


def random_round(seed, num_clients=5, shapes=((3, 4), (7,), (2, 3, 5))):
    rng = np.random.default_rng(seed)
    global_layers = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    clients = [
        [g + 0.1 * rng.standard_normal(g.shape).astype(np.float32) for g in global_layers]
        for _ in range(num_clients)
    ]
    counts = [int(n) for n in rng.integers(1, 100, num_clients)]
    return global_layers, clients, counts


def reference_mean(clients, counts):
    weights = np.asarray(counts, dtype=np.float64) / sum(counts)
    return [
        sum(w * np.asarray(c[i], dtype=np.float64) for w, c in zip(weights, clients))
        for i in range(len(clients[0]))
    ]


def test_fedavg_matches_hand_computed_weighted_mean():
    result = create_strategy("fedavg").aggregate(GLOBAL, CLIENTS, [1, 1, 2])

    np.testing.assert_allclose(result[0], [2.75, 2.5, 2.0, 3.0], rtol=1e-7)
    assert result[0].dtype == np.float32


def test_fedavg_matches_float64_formula_on_random_layers():
    global_layers, clients, counts = random_round(0)

    result = create_strategy("fedavg").aggregate(global_layers, clients, counts)

    for got, expected, layer in zip(result, reference_mean(clients, counts), global_layers):
        assert got.shape == layer.shape
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_scaling_example_counts_changes_nothing():
    global_layers, clients, counts = random_round(1)
    strategy = create_strategy("fedavg")

    base = strategy.aggregate(global_layers, clients, counts)
    scaled = strategy.aggregate(global_layers, clients, [7 * n for n in counts])

    for a, b in zip(base, scaled):
        np.testing.assert_array_equal(a, b)


def test_fedprox_server_side_is_fedavg_and_keeps_mu():
    global_layers, clients, counts = random_round(2)
    strategy = create_strategy("fedprox", proximal_mu=0.01)

    result = strategy.aggregate(global_layers, clients, counts)

    assert strategy.proximal_mu == 0.01
    for got, expected in zip(
        result, create_strategy("fedavg").aggregate(global_layers, clients, counts)
    ):
        np.testing.assert_array_equal(got, expected)


def test_fedsgd_steps_against_the_weighted_gradient():
    global_layers, gradients, counts = random_round(3)

    result = create_strategy("fedsgd", server_learning_rate=0.5).aggregate(
        global_layers, gradients, counts
    )

    for got, g, mean in zip(result, global_layers, reference_mean(gradients, counts)):
        np.testing.assert_allclose(got, g.astype(np.float64) - 0.5 * mean, rtol=1e-6, atol=1e-6)


def test_float64_model_gives_float64_result():
    global_layers = [np.zeros(4)]
    clients = [[c[0].astype(np.float64)] for c in CLIENTS]

    result = create_strategy("fedavg").aggregate(global_layers, clients, [1, 1, 2])

    assert result[0].dtype == np.float64
    np.testing.assert_allclose(result[0], [2.75, 2.5, 2.0, 3.0], rtol=1e-15)


def test_aggregate_slabs_gives_the_same_model_as_aggregate():
    global_layers, clients, counts = random_round(4)
    slabs = allocate_slabs(global_layers, len(clients))
    fill_slabs(slabs, clients)
    strategy = create_strategy("fedavg")

    via_slabs = strategy.aggregate_slabs(global_layers, slabs, counts)

    for a, b in zip(via_slabs, strategy.aggregate(global_layers, clients, counts)):
        np.testing.assert_array_equal(a, b)


def test_integer_layers_are_averaged_as_float32():
    global_layers = [np.zeros(2, dtype=np.int64)]
    clients = [[np.array([1, 2])], [np.array([3, 5])]]

    result = create_strategy("fedavg").aggregate(global_layers, clients, [1, 1])

    np.testing.assert_array_equal(result[0], np.array([2.0, 3.5], dtype=np.float32))


def test_weighted_sum_is_identical_for_one_and_two_threads():
    rng = np.random.default_rng(5)
    slab = rng.standard_normal((9, 20_011)).astype(np.float32)
    weights = rng.random(9)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = fedavg([slab], weights)[0]
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = fedavg([slab], weights)[0]
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_rejected(bad):
    clients = [[c[0].copy()] for c in CLIENTS]
    clients[1][0][2] = bad

    with pytest.raises(ValueError, match="client 1 layer 0 contains NaN or Inf"):
        create_strategy("fedavg").aggregate(GLOBAL, clients, [1, 1, 1])


def test_non_finite_global_model_is_rejected():
    with pytest.raises(ValueError, match="global layer 0 contains NaN or Inf"):
        create_strategy("fedavg").aggregate([np.array([np.nan, 0, 0, 0])], CLIENTS, [1, 1, 1])


@pytest.mark.parametrize("counts", [[1, 0, 1], [1, -3, 1]])
def test_non_positive_example_count_is_rejected(counts):
    with pytest.raises(ValueError, match="client 1 example count must be > 0"):
        create_strategy("fedavg").aggregate(GLOBAL, CLIENTS, counts)


def test_example_count_list_of_wrong_length_is_rejected():
    with pytest.raises(ValueError, match="got 2 example counts for 3 updates"):
        create_strategy("fedavg").aggregate(GLOBAL, CLIENTS, [1, 1])


def test_update_with_missing_layer_is_rejected():
    clients = [list(c) for c in CLIENTS]
    clients[2] = []

    with pytest.raises(ValueError, match="client 2 sent 0 layers; the global model has 1"):
        create_strategy("fedavg").aggregate(GLOBAL, clients, [1, 1, 1])


def test_update_with_wrong_shape_is_rejected():
    clients = [list(c) for c in CLIENTS]
    clients[0] = [np.zeros(5, dtype=np.float32)]

    with pytest.raises(ValueError, match=r"client 0 layer 0 has shape \(5,\)"):
        create_strategy("fedavg").aggregate(GLOBAL, clients, [1, 1, 1])


def test_empty_round_is_rejected():
    with pytest.raises(ValueError, match="no client updates"):
        create_strategy("fedavg").aggregate(GLOBAL, [], [])


def test_fedsgd_rejects_non_positive_learning_rate():
    with pytest.raises(
        ValueError, match=r"fedsgd server_learning_rate must be in \(0, inf\); got 0"
    ):
        create_strategy("fedsgd", server_learning_rate=0)


@pytest.mark.parametrize("rule", ["fedavg", "fedadam", "fedavgm", "multikrum"])
def test_non_finite_global_layer_is_rejected_by_the_fused_check(rule):
    global_layers = [np.zeros(3, np.float32), np.array([0.0, np.nan], np.float32)]
    clients = [[np.ones(3, np.float32), np.ones(2, np.float32)] for _ in range(5)]

    with pytest.raises(ValueError, match="global layer 1 contains NaN or Inf"):
        create_strategy(rule).aggregate(global_layers, clients, [1] * 5)


AVERAGING_RULES = [
    ("fedavg", {}, {}),
    ("fedprox", {"proximal_mu": 0.1}, {}),
    ("fedsgd", {}, {}),
    ("fedavgm", {"server_momentum": 0.9}, {}),
    ("fedadam", {}, {}),
    ("fedyogi", {}, {}),
    ("fedadagrad", {}, {}),
    ("fedbuff", {"buffer_size": 12}, {"staleness": [k % 3 for k in range(12)]}),
    ("perffedavg", {}, {"client_metrics": [{"accuracy": 0.5 + 0.01 * k} for k in range(12)]}),
]


@pytest.mark.parametrize(("rule", "params", "kwargs"), AVERAGING_RULES)
def test_averaging_rules_read_client_arrays_without_building_a_slab(rule, params, kwargs):
    global_layers, clients, counts = random_round(6, num_clients=12, shapes=((400_000,),))
    output_bytes = global_layers[0].nbytes
    strategy = create_strategy(rule, **params)
    strategy.aggregate(global_layers, clients, counts, **kwargs)

    tracemalloc.start()
    try:
        strategy.aggregate(global_layers, clients, counts, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert strategy.reads_client_arrays
    # A slab would take 12 outputs (19.2 MB); beyond the 1.6 MB output only bookkeeping
    # that does not grow with d (about 40-70 KB of Python objects) is allowed.
    assert peak <= output_bytes + 131_072


@pytest.mark.parametrize(("rule", "params", "kwargs"), AVERAGING_RULES)
def test_client_arrays_give_the_same_bits_as_slabs(rule, params, kwargs):
    global_layers, clients, counts = random_round(7, num_clients=12)
    slabs = allocate_slabs(global_layers, len(clients))
    fill_slabs(slabs, clients)

    via_slabs = create_strategy(rule, **params).aggregate_slabs(
        global_layers, slabs, counts, **kwargs
    )
    via_arrays = create_strategy(rule, **params).aggregate(
        global_layers, clients, counts, **kwargs
    )

    for a, b in zip(via_slabs, via_arrays, strict=True):
        np.testing.assert_array_equal(a, b)


def test_client_arrays_of_other_dtypes_and_layouts_are_averaged_as_the_model_dtype():
    global_layers, clients, counts = random_round(8, num_clients=4, shapes=((6, 8),))
    plain = [c[0] for c in clients]
    unaligned = np.frombuffer(bytearray(plain[3].nbytes + 1), np.float32, 48, offset=1)
    mixed = [
        [plain[0].astype(np.float64)],
        [np.asfortranarray(plain[1])],
        [plain[2].astype(np.float16)],
        [unaligned.reshape(6, 8)],
    ]
    unaligned[:] = plain[3].reshape(-1)
    as_float32 = [plain[0], plain[1], plain[2].astype(np.float16).astype(np.float32), plain[3]]
    expected_inputs = [[layer] for layer in as_float32]

    result = create_strategy("fedavg").aggregate(global_layers, mixed, counts)

    expected = create_strategy("fedavg").aggregate(global_layers, expected_inputs, counts)
    assert result[0].dtype == np.float32
    np.testing.assert_array_equal(result[0], expected[0])
    np.testing.assert_allclose(result[0], reference_mean(expected_inputs, counts)[0], rtol=1e-6)


def test_client_arrays_are_left_unchanged():
    global_layers, clients, counts = random_round(9)
    before = [[layer.copy() for layer in layers] for layers in clients]

    create_strategy("fedadam").aggregate(global_layers, clients, counts)

    for layers, kept in zip(clients, before, strict=True):
        for layer, original in zip(layers, kept, strict=True):
            np.testing.assert_array_equal(layer, original)

