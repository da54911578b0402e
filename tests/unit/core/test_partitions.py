"""Which partition a training is in, and which live coordinator should hold each partition."""

from __future__ import annotations

from collections import Counter

import pytest

from federated_learning.coordination.partitions import (
    Partition,
    partition_of,
    preferred_holder,
    training_of_payload,
)


def test_a_trainings_partition_is_the_same_everywhere_and_the_partitions_share_the_trainings() -> None:
    assert partition_of("digits-1", 1) == 0
    counts = Counter(partition_of(f"training-{k}", 8) for k in range(8000))
    assert set(counts) == set(range(8))
    assert min(counts.values()) > 850 and max(counts.values()) < 1150, counts
    assert [partition_of("t", 16) for _ in range(3)] == [partition_of("t", 16)] * 3


def test_partition_of_is_sha256_of_the_id() -> None:
    import hashlib

    for training_id in ("a", "digits", "x" * 64):
        expected = int.from_bytes(hashlib.sha256(training_id.encode()).digest()[:8], "big") % 7
        assert partition_of(training_id, 7) == expected


def test_live_coordinators_take_the_partitions_in_turn_by_name() -> None:
    members = ("coordinator-1", "coordinator-0")
    assert [preferred_holder(members, p) for p in range(4)] == [
        "coordinator-0", "coordinator-1", "coordinator-0", "coordinator-1"]
    assert preferred_holder(("coordinator-2",), 3) == "coordinator-2"
    assert preferred_holder((), 0) is None


def test_a_partition_owns_its_trainings_and_the_first_also_unreadable_entries() -> None:
    first, second = Partition(0, 2), Partition(1, 2)
    for training_id in (f"t{k}" for k in range(20)):
        assert first.owns(training_id) != second.owns(training_id)
    assert first.owns(None) and not second.owns(None)
    assert first.keeps_registry and not second.keeps_registry
    assert Partition(0).owns("anything") and second.name() == "p1 of 2"
    for index, count in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="does not exist"):
            Partition(index, count)


def test_an_entrys_training_is_read_without_validating_the_message() -> None:
    assert training_of_payload(b'{"type": "update_submitted", "training_id": "t1", "x": [1]}') == "t1"
    for payload in (None, b"", b"not json", b"[1, 2]", b'{"training_id": 7}', b'{"type": "heartbeat"}'):
        assert training_of_payload(payload) is None
