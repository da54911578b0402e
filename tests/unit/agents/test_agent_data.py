"""Digits loading, global test split, iid and Dirichlet partitions, client datasets."""

import numpy as np
import pytest

from agents.data import (
    PartitionSpec,
    load_digits_dataset,
    make_client_datasets,
    parse_partition,
    partition_dirichlet,
    partition_iid,
    rebalance_min_size,
    train_test_split,
)


def labels(n_per_class: int = 50, num_classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(num_classes), n_per_class)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(merged), np.arange(n))


def test_digits_are_scaled_float32() -> None:
    data = load_digits_dataset()
    assert data.x.shape == (1797, 64)
    assert data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    assert data.x.min() == 0.0 and data.x.max() == 1.0


def test_global_split_is_stratified_and_deterministic() -> None:
    data = load_digits_dataset()
    train, test = train_test_split(data, test_fraction=0.2, seed=0)
    again, _ = train_test_split(data, test_fraction=0.2, seed=0)
    assert len(test) == 360 and len(train) == 1437
    np.testing.assert_array_equal(train.y, again.y)
    share = np.bincount(test.y) / np.bincount(data.y)
    assert np.all(np.abs(share - 0.2) < 0.02)


def test_iid_partition_covers_every_example_once() -> None:
    y = labels()
    parts = partition_iid(y, 7, np.random.default_rng(0))
    assert_exact_cover(parts, len(y))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_partition_covers_every_example_once_with_min_size() -> None:
    y = labels()
    parts = partition_dirichlet(y, 20, 0.1, np.random.default_rng(0), min_size=8)
    assert_exact_cover(parts, len(y))
    assert min(map(len, parts)) >= 8


def test_rebalance_moves_the_donors_majority_class_to_the_smallest_client() -> None:
    parts = [[0, 1, 2, 3, 4], [5]]
    rebalance_min_size(parts, np.array([0, 0, 0, 1, 1, 1]), min_size=2)
    assert parts == [[0, 1, 3, 4], [5, 2]]


def test_69_clients_with_tiny_alpha_all_reach_min_size() -> None:
    clients, _ = make_client_datasets(69, "dirichlet:0.05", seed=0)
    assert min(len(c.train) + len(c.eval) for c in clients) >= 8
    assert sum(len(c.train) + len(c.eval) for c in clients) == 1437


def test_small_alpha_is_skewed_and_large_alpha_is_not() -> None:
    y = labels(100)

    def mean_classes_for_90_percent(alpha: float) -> float:
        parts = partition_dirichlet(y, 10, alpha, np.random.default_rng(0), min_size=8)
        counts = [np.sort(np.bincount(y[p], minlength=10))[::-1] for p in parts]
        return float(np.mean([np.searchsorted(np.cumsum(c) / c.sum(), 0.9) + 1 for c in counts]))

    assert mean_classes_for_90_percent(0.1) <= 3
    assert mean_classes_for_90_percent(100.0) >= 8


def test_dirichlet_partition_is_deterministic_under_seed() -> None:
    y = labels()
    a = partition_dirichlet(y, 10, 0.5, np.random.default_rng(3))
    b = partition_dirichlet(y, 10, 0.5, np.random.default_rng(3))
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)


def test_too_many_clients_for_min_size_is_refused() -> None:
    with pytest.raises(ValueError, match="need 88 examples; got 50"):
        partition_dirichlet(labels(5), 11, 0.5, np.random.default_rng(0), min_size=8)


def test_bad_alpha_is_refused() -> None:
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        partition_dirichlet(labels(), 5, 0.0, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("text", "spec"),
    [("iid", PartitionSpec("iid")), ("dirichlet:0.5", PartitionSpec("dirichlet", 0.5))],
)
def test_parse_partition(text: str, spec: PartitionSpec) -> None:
    assert parse_partition(text) == spec
    assert str(spec) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dirichlet", "unknown partition"),
        ("iid:2", "unknown partition"),
        ("shards:2", "unknown partition"),
        ("dirichlet:abc", "alpha 'abc' is not a number"),
        ("dirichlet:-1", "alpha must be finite and > 0"),
        ("dirichlet:inf", "alpha must be finite and > 0"),
    ],
)
def test_bad_partition_text_is_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_partition(text)


def test_client_datasets_split_all_training_data_and_keep_eval_examples() -> None:
    clients, test = make_client_datasets(69, "dirichlet:0.5", seed=0)
    assert len(clients) == 69 and len(test) == 360
    assert sum(len(c.train) + len(c.eval) for c in clients) == 1437
    assert all(len(c.eval) >= 1 and len(c.train) >= 1 for c in clients)
    assert all(len(c.train) + len(c.eval) >= 8 for c in clients)
    assert [c.client_id for c in clients] == list(range(69))


def test_client_datasets_are_deterministic_under_seed() -> None:
    a, test_a = make_client_datasets(10, "iid", seed=4)
    b, _ = make_client_datasets(10, "iid", seed=4)
    c, test_c = make_client_datasets(10, "iid", seed=5)
    np.testing.assert_array_equal(a[3].train.x, b[3].train.x)
    np.testing.assert_array_equal(test_a.y, test_c.y)
    assert not np.array_equal(a[3].train.y, c[3].train.y)
