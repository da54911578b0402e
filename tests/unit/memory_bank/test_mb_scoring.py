"""nearest_distances against brute force; roc_auc against a hand count and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score

from federated_learning.memory_bank import nearest_distances, roc_auc, scoring


def pair_count_auc(labels: NDArray[np.int64], scores: NDArray[np.float64]) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return float(wins / (pos.size * neg.size))


def test_nearest_distances_of_a_small_example() -> None:
    bank = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    queries = np.array([[0.0, 1.0], [3.0, 4.0], [6.0, 8.0]], dtype=np.float32)

    np.testing.assert_allclose(nearest_distances(bank, queries), [1.0, 0.0, 5.0])


def test_nearest_distances_match_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scoring, "QUERY_BLOCK_BYTES", 4 * 50 * 7)
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((50, 16)) + 100.0
    queries = rng.standard_normal((333, 16)) + 100.0

    found = nearest_distances(bank, queries)

    expected = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(axis=2)).min(axis=1)
    assert found.dtype == np.float32 and found.shape == (333,)
    np.testing.assert_allclose(found, expected, rtol=1e-5)


def test_nearest_distances_rejects_a_width_mismatch() -> None:
    with pytest.raises(ValueError, match="queries has 3 features; the bank has 2"):
        nearest_distances(np.zeros((4, 2)), np.zeros((1, 3)))


def test_roc_auc_of_a_small_example() -> None:
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right.
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75


def test_roc_auc_counts_ties_as_one_half() -> None:
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([1.0, 1.0, 0.0, 2.0])) == 0.875


def test_roc_auc_matches_pair_counting_and_sklearn() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.standard_normal(500) + labels, 1)

    auc = roc_auc(labels, scores)

    assert auc == pytest.approx(pair_count_auc(labels, scores), abs=1e-12)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="needs both classes; got 0 positives and 3 negatives"):
        roc_auc(np.zeros(3), np.arange(3.0))
