"""A cell's outbox: how a coordinator step of a partition other than 0 reaches the agents.

Agents' inboxes are the deployment's (cell 0: ``protocol/keys.py``), so that an agent reads one
inbox whatever partitions its trainings are in. A step of cell k writes its transaction in cell
k's hash slot, so it cannot add to an inbox there: it appends each task or message to the cell's
outbox in the same transaction, and the partition's coordinator forwards the outbox to the
inboxes (with the agent's ``asked`` counter and task times, the hourly cap's, which are the
deployment's too). Forwarding is exactly once: each forwarded entry leaves a marker in the same
transaction as its inbox entry, and an entry delivered again (its forwarder died before the
acknowledgement) finds the marker and is skipped.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from federated_learning.bus.replies import text
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import StreamFields

INBOX_MAXLEN = 1000
"""Entries an agent's inbox keeps (it reads its tasks as they come; older ones are moot)."""
ASKED_AT_HORIZON_S = 3600.0
"""How long a task's time is kept for the hourly cap (``max_tasks_per_agent_per_hour``)."""
FORWARDED_MARKER_TTL_S = 24 * 3600
"""How long a forwarded entry's marker is kept (redeliveries come within minutes of a crash)."""

_TO = b"to"
_ASKED = b"asked"


def stage_to_agent(pipe: Pipeline, keys: Keys, agent_id: str, message: StreamFields, *,
                   asked: str | None = None, now: float | None = None) -> None:
    """Add ``message`` for ``agent_id`` to ``pipe``, a transaction of ``keys``'s cell: to the inbox
    in cell 0, else to the cell's outbox. ``asked``: the task's id (training/round/attempt), when
    the message asks the agent to work (counted, and timed for the hourly cap)."""
    if keys.cell != 0:
        entry: StreamFields = {**message, _TO: agent_id}
        if asked is not None:
            entry[_ASKED] = asked
        pipe.xadd(keys.outbox_stream, entry)
        return
    _stage_delivery(pipe, keys, agent_id, message, asked, time.time() if now is None else now)


def _stage_delivery(pipe: Pipeline, keys: Keys, agent_id: str, message: StreamFields,
                    asked: str | None, now: float) -> None:
    pipe.xadd(keys.inbox_stream(agent_id), message, maxlen=INBOX_MAXLEN, approximate=True)
    if asked is not None:
        pipe.hincrby(keys.agent_stats, f"{agent_id}:asked", 1)
        asked_at = keys.agent_asked_at(agent_id)
        pipe.zadd(asked_at, {asked: now})
        pipe.zremrangebyscore(asked_at, 0, now - ASKED_AT_HORIZON_S)


class OutboxForwarder:
    """Forwards one cell's outbox entries to the agents' inboxes (run by the partition's coordinator)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        if keys.cell == 0:
            raise ValueError("cell 0 writes to the inboxes directly; it has no outbox")
        self._redis = redis
        self._cell = keys.cell
        self._deployment = keys.global_keys

    def _marker(self, entry_id: bytes) -> str:
        return self._deployment.applied(f"forwarder-p{self._cell}", entry_id.decode())

    async def forward(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        await self.forward_batch([(entry_id, fields)])

    async def forward_batch(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Deliver the entries not yet forwarded, with their markers, in one transaction that
        fails if another forwarder (a holder that lost the partition while paused) marked any of
        them meanwhile: then the markers are read again."""
        for _entry_id, fields in entries:
            if _TO not in fields:
                raise ValueError(f"an outbox entry of cell {self._cell} names no agent: {sorted(fields)}")
        markers = [self._marker(entry_id) for entry_id, _ in entries]
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(*markers)
                    # Read after the WATCH (on another connection: a cluster transaction runs no
                    # MGET): a marker set from now on fails the EXEC, and the loop reads again.
                    async with self._redis.pipeline(transaction=False) as reads:
                        for marker in markers:
                            reads.get(marker)
                        seen = await reads.execute()
                    pipe.multi()  # type: ignore[no-untyped-call]
                    now = time.time()
                    for (_entry_id, fields), marker, done in zip(entries, markers, seen, strict=True):
                        if done is not None:
                            continue
                        message: StreamFields = {name: value for name, value in fields.items()
                                                 if name not in (_TO, _ASKED)}
                        asked = text(fields[_ASKED]) if _ASKED in fields else None
                        _stage_delivery(pipe, self._deployment, text(fields[_TO]), message, asked, now)
                        pipe.set(marker, 1, ex=FORWARDED_MARKER_TTL_S)
                    await pipe.execute()
                    return
                except WatchError:
                    continue
