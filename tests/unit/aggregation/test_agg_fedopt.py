import numpy as np
import pytest

from federated_learning.aggregation import create_strategy


def rounds_of_updates(seed, num_rounds=3, num_clients=4, shapes=((3, 4), (5,))):
    rng = np.random.default_rng(seed)
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    rounds = []
    for _ in range(num_rounds):
        clients = [
            [0.2 * rng.standard_normal(s).astype(np.float32) for s in shapes]
            for _ in range(num_clients)
        ]
        rounds.append((clients, [int(n) for n in rng.integers(1, 50, num_clients)]))
    return start, rounds


def flower_fedopt(kind, start, rounds, eta, beta_1, beta_2, tau):
    """Flower 1.4x FedAdam / FedYogi / FedAdagrad aggregate_fit, in float64, clients = offsets."""
    current = [np.asarray(layer, dtype=np.float64) for layer in start]
    m = v = None
    history = []
    for server_round, (offsets, counts) in enumerate(rounds, start=1):
        total = sum(counts)
        fedavg = [
            sum(n * (c + o[i].astype(np.float64)) for n, o in zip(counts, offsets)) / total
            for i, c in enumerate(current)
        ]
        delta = [x - y for x, y in zip(fedavg, current)]
        m = m or [np.zeros_like(x) for x in delta]
        v = v or [np.zeros_like(x) for x in delta]
        m = [beta_1 * x + (1 - beta_1) * y for x, y in zip(m, delta)]
        if kind == "fedadam":
            v = [beta_2 * x + (1 - beta_2) * y * y for x, y in zip(v, delta)]
            step = (
                eta
                * np.sqrt(1 - beta_2 ** (server_round + 1.0))
                / (1 - beta_1 ** (server_round + 1.0))
            )
        elif kind == "fedyogi":
            v = [x - (1.0 - beta_2) * y * y * np.sign(x - y * y) for x, y in zip(v, delta)]
            step = eta
        else:
            v = [x + y * y for x, y in zip(v, delta)]
            step = eta
        current = [x + step * y / (np.sqrt(z) + tau) for x, y, z in zip(current, m, v)]
        history.append(current)
    return history


def run_rounds(strategy, start, rounds):
    current = start
    history = []
    for offsets, counts in rounds:
        clients = [[c + o for c, o in zip(current, off)] for off in offsets]
        current = strategy.aggregate(current, clients, counts)
        history.append(current)
    return history


FLOWER_DEFAULTS = {
    "fedadam": {"eta": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9},
    "fedyogi": {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"eta": 1e-1, "beta_1": 0.0, "beta_2": 0.0, "tau": 1e-9},
}


@pytest.mark.parametrize("kind", sorted(FLOWER_DEFAULTS))
def test_three_rounds_match_flower_formulas_with_flower_defaults(kind):
    start, rounds = rounds_of_updates(0)

    ours = run_rounds(create_strategy(kind), start, rounds)

    reference = flower_fedopt(kind, start, rounds, **FLOWER_DEFAULTS[kind])
    for got_round, expected_round in zip(ours, reference):
        for got, expected in zip(got_round, expected_round):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_fedadam_with_custom_hyperparameters_matches_flower():
    params = {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.9, "tau": 1e-3}
    start, rounds = rounds_of_updates(1)

    ours = run_rounds(create_strategy("fedadam", eta_l=0.01, **params), start, rounds)

    for got, expected in zip(ours[-1], flower_fedopt("fedadam", start, rounds, **params)[-1]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_first_fedadagrad_round_moves_each_weight_by_eta_times_sign_of_delta():
    global_layers = [np.zeros(4, dtype=np.float32)]
    clients = [[np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32)]]

    result = create_strategy("fedadagrad", eta=0.1).aggregate(global_layers, clients, [3])

    np.testing.assert_allclose(result[0], [0.1, -0.1, 0.1, 0.0], rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(FLOWER_DEFAULTS))
def test_state_dict_round_trip_continues_identically(kind):
    start, rounds = rounds_of_updates(2)
    first = create_strategy(kind)
    after_two = run_rounds(first, start, rounds[:2])[-1]

    restored = create_strategy(kind)
    restored.load_state_dict(first.state_dict())
    continued = run_rounds(restored, after_two, rounds[2:])[-1]
    uninterrupted = run_rounds(first, after_two, rounds[2:])[-1]

    for a, b in zip(continued, uninterrupted):
        np.testing.assert_array_equal(a, b)


def test_state_dict_holds_flat_moments_and_the_round():
    start, rounds = rounds_of_updates(3, num_rounds=2)
    strategy = create_strategy("fedadam")
    run_rounds(strategy, start, rounds)

    state = strategy.state_dict()

    assert sorted(state) == ["m.0", "m.1", "server_round", "v.0", "v.1"]
    assert state["m.0"].shape == (12,) and state["m.0"].dtype == np.float32
    assert state["server_round"].tolist() == [2]


def test_unknown_state_key_is_rejected():
    with pytest.raises(ValueError, match=r"fedyogi state has unknown keys \['momentum'\]"):
        create_strategy("fedyogi").load_state_dict({"momentum": np.zeros(3, np.float32)})


def test_state_of_another_model_shape_is_rejected():
    strategy = create_strategy("fedadam")
    strategy.load_state_dict({"m.0": np.zeros(3, np.float32), "v.0": np.zeros(3, np.float32)})

    with pytest.raises(ValueError, match="fedadam state layer 0 is float32"):
        strategy.aggregate([np.zeros(4, np.float32)], [[np.ones(4, np.float32)]], [1])


def test_failed_round_leaves_the_moments_untouched():
    strategy = create_strategy("fedadam")
    strategy.aggregate([np.zeros(2, np.float32)], [[np.ones(2, np.float32)]], [1])
    before = strategy.state_dict()

    with pytest.raises(ValueError, match="contains NaN or Inf"):
        strategy.aggregate([np.zeros(2, np.float32)], [[np.array([1.0, np.nan], np.float32)]], [1])

    after = strategy.state_dict()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"beta_1": 1.0}, r"fedadam beta_1 must be in \[0, 1\); got 1.0"),
        ({"beta_2": -0.1}, r"fedadam beta_2 must be in \[0, 1\); got -0.1"),
        ({"eta": 0.0}, r"fedadam eta must be in \(0, inf\); got 0.0"),
        ({"tau": "small"}, r"fedadam tau must be a number in \(0, inf\); got 'small'"),
    ],
)
def test_invalid_hyperparameter_is_rejected(params, message):
    with pytest.raises(ValueError, match=message):
        create_strategy("fedadam", **params)


def test_fedadagrad_has_no_beta_parameters():
    with pytest.raises(ValueError, match="fedadagrad has no parameter 'beta_1'"):
        create_strategy("fedadagrad", beta_1=0.9)
