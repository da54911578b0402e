import numpy as np
import pytest

from federated_learning.aggregation import create_strategy


def rounds_of_updates(seed, num_rounds=3, num_clients=4, shapes=((3, 4), (5,))):
    rng = np.random.default_rng(seed)
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    rounds = [
        (
            [
                [0.2 * rng.standard_normal(s).astype(np.float32) for s in shapes]
                for _ in range(num_clients)
            ],
            [int(n) for n in rng.integers(1, 50, num_clients)],
        )
        for _ in range(num_rounds)
    ]
    return start, rounds


def flower_fedavgm(start, rounds, server_learning_rate, server_momentum):
    """Flower 1.4x FedAvgM.aggregate_fit in float64 (clients = current + offsets)."""
    current = [np.asarray(layer, dtype=np.float64) for layer in start]
    momentum_vector = None
    history = []
    for server_round, (offsets, counts) in enumerate(rounds, start=1):
        fedavg = [
            sum(n * (c + o[i].astype(np.float64)) for n, o in zip(counts, offsets)) / sum(counts)
            for i, c in enumerate(current)
        ]
        pseudo_gradient = [x - y for x, y in zip(current, fedavg)]
        if server_momentum > 0.0:
            if server_round > 1:
                momentum_vector = [
                    server_momentum * x + y for x, y in zip(momentum_vector, pseudo_gradient)
                ]
            else:
                momentum_vector = pseudo_gradient
            pseudo_gradient = momentum_vector
        current = [x - server_learning_rate * y for x, y in zip(current, pseudo_gradient)]
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


@pytest.mark.parametrize(("lr", "momentum"), [(1.0, 0.9), (0.5, 0.0), (0.7, 0.5)])
def test_three_rounds_match_flower_formulas(lr, momentum):
    start, rounds = rounds_of_updates(0)

    ours = run_rounds(
        create_strategy("fedavgm", server_learning_rate=lr, server_momentum=momentum), start, rounds
    )

    for got_round, expected_round in zip(ours, flower_fedavgm(start, rounds, lr, momentum)):
        for got, expected in zip(got_round, expected_round):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_default_fedavgm_is_fedavg():
    start, rounds = rounds_of_updates(1, num_rounds=1)
    clients = [[c + o for c, o in zip(start, off)] for off in rounds[0][0]]

    ours = create_strategy("fedavgm").aggregate(start, clients, rounds[0][1])

    for a, b in zip(ours, create_strategy("fedavg").aggregate(start, clients, rounds[0][1])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_continues_identically():
    start, rounds = rounds_of_updates(2)
    first = create_strategy("fedavgm", server_momentum=0.9)
    after_two = run_rounds(first, start, rounds[:2])[-1]

    restored = create_strategy("fedavgm", server_momentum=0.9)
    restored.load_state_dict(first.state_dict())

    continued = run_rounds(restored, after_two, rounds[2:])[-1]
    uninterrupted = run_rounds(first, after_two, rounds[2:])[-1]
    for a, b in zip(continued, uninterrupted):
        np.testing.assert_array_equal(a, b)


def test_momentum_of_one_is_rejected():
    with pytest.raises(ValueError, match=r"fedavgm server_momentum must be in \[0, 1\); got 1.0"):
        create_strategy("fedavgm", server_momentum=1.0)
