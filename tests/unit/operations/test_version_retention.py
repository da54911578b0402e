import pytest

from federated_learning.versioning.retention import versions_to_delete


def test_keeps_last_best_initial_and_protected() -> None:
    scores = {v: 0.1 * v for v in range(10)} | {3: 0.95, 5: 0.9}
    assert versions_to_delete(list(range(10)), scores, keep_last=2, keep_best=1, protected={6}) == [1, 2, 4, 5, 7]


def test_initial_version_is_never_deleted() -> None:
    assert versions_to_delete([0, 1, 2], {}, keep_last=0, keep_best=0, protected=set()) == [1, 2]


def test_best_ties_keep_the_newest() -> None:
    scores = {1: 0.5, 2: 0.5, 3: 0.1}
    assert versions_to_delete([0, 1, 2, 3], scores, keep_last=0, keep_best=1, protected=set()) == [1, 3]


def test_unscored_versions_are_never_best() -> None:
    scores = {1: float("nan"), 2: 0.2}
    assert versions_to_delete([0, 1, 2, 3], scores, keep_last=0, keep_best=2, protected=set()) == [1, 3]


def test_negative_keep_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        versions_to_delete([0, 1], {}, keep_last=-1, keep_best=0, protected=set())
