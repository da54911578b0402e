"""Trainings split among active coordinators: which partition a training is in, and which live
coordinator should hold each partition.

A deployment has a fixed number of partitions (``coordinator_partitions``). Each has its own
lease, consumer group and epoch, so the coordinator holding a partition is the single writer of
its trainings (decision 0004) while other coordinators work on the other partitions. Partition 0
also owns what belongs to no training: the agent registry, the queue's metrics, the blob sweep.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from federated_learning.protocol.keys import partition_of

__all__ = ["REGISTRY_PARTITION", "Partition", "partition_of", "preferred_holder", "training_of_payload"]

REGISTRY_PARTITION = 0
"""The partition whose holder also keeps the agent registry (joins, heartbeats, leaves)."""


def preferred_holder(members: Sequence[str], partition: int) -> str | None:
    """The live coordinator that should hold ``partition``: members in name order take the
    partitions in turn, so every coordinator sees the same assignment (None: no member known)."""
    if not members:
        return None
    ordered = sorted(members)
    return ordered[partition % len(ordered)]


@dataclass(frozen=True)
class Partition:
    """One partition of a deployment's trainings."""

    index: int
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"partition {self.index} of {self.count} does not exist")

    @property
    def keeps_registry(self) -> bool:
        return self.index == REGISTRY_PARTITION

    def owns(self, training_id: str | None) -> bool:
        """Whether this partition handles entries about ``training_id``; an entry whose training
        cannot be read (a malformed message) is the registry partition's, to be refused once."""
        if training_id is None:
            return self.keeps_registry
        return partition_of(training_id, self.count) == self.index

    def name(self) -> str:
        """As in the partition's key and group names: ``p0 of 4`` is ``lease:coordinator:p0``."""
        return f"p{self.index} of {self.count}"


def training_of_payload(payload: bytes | None) -> str | None:
    """The ``training_id`` of a message's JSON without validating the rest (None when there is
    none, or the JSON cannot be read): enough to route an entry to its partition."""
    if payload is None:
        return None
    try:
        message = json.loads(payload)
    except ValueError:
        return None
    training_id = message.get("training_id") if isinstance(message, dict) else None
    return training_id if isinstance(training_id, str) else None
