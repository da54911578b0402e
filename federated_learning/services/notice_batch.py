"""What the coordinator reads and writes while it handles one read of update notices as a batch.

Handling a notice on its own takes about six sequential round trips (the agent's record, the
duplicate check, the accepting transaction, the tally, the ack). A batch keeps the per-notice
order and the decisions exactly as they were, and changes only the I/O:

- the duplicate flags and the upload's size and header of every notice, and the records of agents
  the registry does not keep yet, are read in one pipeline first;
- the writes of each step (accepted updates, outcomes, refusals' state saves, events) go into
  one pending transaction, executed once at the end of the batch (or before any step that must
  read what was written: closing a round, counting a late update, opening the next round);
- a round's tally counts the accepted updates read once plus those accepted in the batch.

A read cached here is valid only while the batch's writes are the only ones it could miss:
every flush drops the caches, and a miss reads Redis again. (The agents' records are kept by the
registry itself, their only writer.)

A crash before the flush loses nothing: no entry of the batch is acked, and each is handled again
(a redelivery finds nothing written). A crash after it finds the accepted-entry markers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio.client import Pipeline

from federated_learning.bus.blobs import BlobHead
from federated_learning.protocol.messages import UpdateSubmitted

RoundKey = tuple[str, int]
"""(training id, round)."""


@dataclass
class DuplicateFlags:
    """Whether the agent already has an accepted update in the round, and whether the entry is
    the one it was accepted from."""

    accepted: bool
    from_this_entry: bool


@dataclass
class NoticeBatch:
    pipe: Pipeline | None = None
    """The pending transaction: the writes of the batch's steps, in order; begun (under the
    lease's fence) at the first write after the batch starts or after it was executed."""
    notices: dict[bytes, UpdateSubmitted] = field(default_factory=dict)
    """The batch's update notices by entry id, decoded once."""
    heads: dict[tuple[str, str], BlobHead] = field(default_factory=dict)
    """(digest, agent) -> the upload's size and header (blobs are written once: kept across flushes)."""
    duplicates: dict[tuple[str, int, str, str], DuplicateFlags] = field(default_factory=dict)
    """(training, round, agent, entry id) -> flags, as read before the batch's first write."""
    accepted_counts: dict[RoundKey, int] = field(default_factory=dict)
    """Accepted updates of a round as last read from Redis."""
    volunteers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Live volunteers of a training, read at its first tally in the batch."""
    accepted_here: dict[RoundKey, set[str]] = field(default_factory=dict)
    """Agents whose update the pending transaction accepts, by round."""
    pending_writes: int = 0

    def accept(self, training_id: str, round_number: int, agent_id: str) -> None:
        self.accepted_here.setdefault((training_id, round_number), set()).add(agent_id)

    def accepted_in_batch(self, training_id: str, round_number: int, agent_id: str) -> bool:
        return agent_id in self.accepted_here.get((training_id, round_number), ())

    def accepted_count(self, training_id: str, round_number: int) -> int | None:
        """The round's accepted updates including the pending ones; None when not read yet."""
        key = (training_id, round_number)
        read = self.accepted_counts.get(key)
        return None if read is None else read + len(self.accepted_here.get(key, ()))

    def written(self) -> None:
        """The pending transaction was executed: drop it and what it may have changed."""
        self.pipe = None
        self.pending_writes = 0
        self.duplicates.clear()
        self.accepted_counts.clear()
        self.volunteers.clear()
        self.accepted_here.clear()
