"""A cell's outbox (``services/outbox.py``): a step of a partition other than 0 stages its tasks
there, and the forwarder delivers each to its agent's inbox exactly once."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from federated_learning.protocol.keys import Keys
from federated_learning.services.outbox import OutboxForwarder, stage_to_agent

KEYS = Keys(partitions=3)


async def stage(redis: aioredis.Redis, keys: Keys, *messages: tuple[str, bytes, str | None]) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        for agent_id, payload, asked in messages:
            stage_to_agent(pipe, keys, agent_id, {b"m": payload}, asked=asked, now=1000.0)
        await pipe.execute()


async def test_cell_0_writes_the_inboxes_directly(redis: aioredis.Redis) -> None:
    await stage(redis, KEYS, ("a1", b"task", "t/1/1"))
    [(_, fields)] = await redis.xrange(KEYS.inbox_stream("a1"))
    assert fields == {b"m": b"task"}
    assert await redis.hget(KEYS.agent_stats, "a1:asked") == b"1"
    assert await redis.zrange(KEYS.agent_asked_at("a1"), 0, -1) == [b"t/1/1"]


async def test_a_cells_tasks_reach_the_inboxes_once_through_its_outbox(redis: aioredis.Redis) -> None:
    cell = KEYS.in_cell(2)
    await stage(redis, cell, ("a1", b"task-1", "t/1/1"), ("a2", b"task-2", "t/1/1"), ("a1", b"keys", None))
    assert not await redis.exists(KEYS.inbox_stream("a1")), "nothing reaches an inbox before it is forwarded"
    entries = await redis.xrange(cell.outbox_stream)
    assert len(entries) == 3

    forwarder = OutboxForwarder(redis, cell)
    await forwarder.forward_batch(entries)
    await forwarder.forward_batch(entries)  # delivered again: its forwarder died before the ack
    await forwarder.forward(*entries[0])

    assert [fields for _, fields in await redis.xrange(KEYS.inbox_stream("a1"))] == [{b"m": b"task-1"}, {b"m": b"keys"}]
    assert [fields for _, fields in await redis.xrange(KEYS.inbox_stream("a2"))] == [{b"m": b"task-2"}]
    # Asked once each (the message that is not a task counts nothing), on the deployment's counters.
    assert await redis.hgetall(KEYS.agent_stats) == {b"a1:asked": b"1", b"a2:asked": b"1"}
    assert not await redis.exists(cell.agent_stats)


async def test_two_forwarders_of_one_cell_deliver_each_entry_once(redis: aioredis.Redis) -> None:
    """A holder that lost the partition while paused and its successor forward the same read."""
    cell = KEYS.in_cell(1)
    await stage(redis, cell, *((f"a{i}", b"task", "t/1/1") for i in range(50)))
    entries = await redis.xrange(cell.outbox_stream)
    await asyncio.gather(*(OutboxForwarder(redis, cell).forward_batch(entries) for _ in range(4)))
    assert [await redis.xlen(KEYS.inbox_stream(f"a{i}")) for i in range(50)] == [1] * 50
    assert set((await redis.hgetall(KEYS.agent_stats)).values()) == {b"1"}


async def test_an_entry_naming_no_agent_is_refused(redis: aioredis.Redis) -> None:
    forwarder = OutboxForwarder(redis, KEYS.in_cell(1))
    with pytest.raises(ValueError, match="names no agent"):
        await forwarder.forward(b"1-1", {b"m": b"task"})


def test_cell_0_has_no_outbox(redis: aioredis.Redis) -> None:
    with pytest.raises(ValueError, match="no outbox"):
        OutboxForwarder(redis, KEYS)
