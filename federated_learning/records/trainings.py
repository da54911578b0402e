"""Trainings in Redis: the coordinator's state and its published view (one JSON each per training),
an index (and one per organisation), an active set and a queue.

:class:`TrainingStore` is the coordinator's (its only writer); every other process reads
:class:`TrainingViews`."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from federated_learning.bus.replies import text
from federated_learning.coordination.state import TrainingState
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import RoundMetrics
from federated_learning.protocol.trainings import TrainingView

QUEUE_READ = 1000
"""Queued trainings a coordinator looks at per activation (its partition's may be further back)."""
_CLAIM_SLOT_LUA = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
local free = tonumber(ARGV[2]) - redis.call('SCARD', KEYS[1])
if free <= 0 then return 0 end
local position = redis.call('LPOS', KEYS[2], ARGV[1])
if position and position >= free then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""

class TrainingViews:
    """The published views of trainings (``protocol/trainings.py``), their index and their metrics."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def get(self, training_id: str) -> TrainingView | None:
        raw = await self._redis.get(self._keys.training_view(training_id))
        return None if raw is None else TrainingView.model_validate_json(raw)

    async def get_many(self, training_ids: list[str]) -> list[TrainingView]:
        """The views of the trainings that exist, in one round trip (a pipeline, not MGET: each
        training's key has its own hash tag, so a Redis Cluster keeps them on different slots)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for training_id in training_ids:
                pipe.get(self._keys.training_view(training_id))
            replies = await pipe.execute()
        return [TrainingView.model_validate_json(raw) for raw in replies if raw is not None]

    async def list_ids(self, limit: int = 100, org_id: str | None = None) -> list[str]:
        """The newest trainings' ids, newest first: every organisation's, or only ``org_id``'s."""
        index = self._keys.trainings if org_id is None else self._keys.org_trainings(org_id)
        members = cast("list[bytes]", await self._redis.zrevrange(index, 0, limit - 1))
        return [m.decode() for m in members]

    async def metrics(self, training_id: str) -> list[RoundMetrics]:
        raw = await self._redis.lrange(self._keys.training_metrics(training_id), 0, -1)
        return [RoundMetrics.model_validate_json(item) for item in raw]

    async def active_ids(self) -> list[str]:
        """Trainings holding a slot (a queued one claims its slot a moment before it initializes)."""
        return sorted(text(m) for m in await self._redis.smembers(self._keys.active_trainings))


class TrainingStore(TrainingViews):
    """The coordinator's states: written with their published view, in one transaction."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        super().__init__(redis, keys)
        self._slot_changes: list[tuple[str, bool]] = []

    async def load(self, training_id: str) -> TrainingState | None:
        raw = await self._redis.get(self._keys.training(training_id))
        return None if raw is None else TrainingState.model_validate_json(raw)

    def _in_index_cell(self, training_id: str) -> bool:
        """Whether the training's keys are in the cell of the deployment's index, queue and active
        set (``protocol/keys.py``), so that one transaction may write them together."""
        return self._keys.for_training(training_id).cell == 0

    async def create(self, state: TrainingState, *, queued: bool) -> None:
        """Write a new training. In another cell than the index's, the index (and queue) first: a
        crash in between leaves an id without a state, which the redelivered start command
        creates (adding an id to the index again changes nothing; a second queue entry is skipped
        and removed with the first)."""
        def stage_index(pipe: Pipeline) -> None:
            pipe.zadd(self._keys.trainings, {state.training_id: state.created_at})
            pipe.zadd(self._keys.org_trainings(state.org_id), {state.training_id: state.created_at})
            if queued:
                pipe.rpush(self._keys.training_queue, state.training_id)

        together = self._in_index_cell(state.training_id)
        if not together:
            async with self._redis.pipeline(transaction=True) as pipe:
                stage_index(pipe)
                await pipe.execute()
        async with self._redis.pipeline(transaction=True) as pipe:
            if together:
                stage_index(pipe)
            pipe.set(self._keys.training(state.training_id), state.model_dump_json())
            pipe.set(self._keys.training_view(state.training_id), state.view().model_dump_json())
            await pipe.execute()

    def stage_save(self, pipe: Pipeline, state: TrainingState, *, active: bool | None = None) -> None:
        """Add the state write (and active-set change) to ``pipe``. A training of another cell than
        the active set's changes the set after the transaction (:meth:`apply_slot_changes`)."""
        state.touch()
        pipe.set(self._keys.training(state.training_id), state.model_dump_json())
        pipe.set(self._keys.training_view(state.training_id), state.view().model_dump_json())
        if active is not None and not self._in_index_cell(state.training_id):
            self._slot_changes.append((state.training_id, active))
        elif active is True:
            pipe.sadd(self._keys.active_trainings, state.training_id)
        elif active is False:
            pipe.srem(self._keys.active_trainings, state.training_id)

    async def apply_slot_changes(self) -> None:
        """Change the active set as the transaction just executed said. A crash before this leaves
        a finished training holding its slot until its partition is taken again
        (:meth:`release_finished_slots`); a started one holds it already (:meth:`claim_slot`)."""
        changes, self._slot_changes = self._slot_changes, []
        for training_id, active in changes:
            if active:
                await self._redis.sadd(self._keys.active_trainings, training_id)
            else:
                await self._redis.srem(self._keys.active_trainings, training_id)

    def drop_slot_changes(self) -> None:
        """Forget the changes of a transaction that did not execute."""
        self._slot_changes.clear()

    async def release_finished_slots(self, owns: Callable[[str], bool]) -> list[str]:
        """Free the slots that finished (or vanished) trainings of a partition still hold; returns their ids."""
        freed = []
        for training_id in await self.active_ids():
            if not owns(training_id):
                continue
            state = await self.load(training_id)
            if state is None or state.status.is_final:
                await self._redis.srem(self._keys.active_trainings, training_id)
                freed.append(training_id)
        return freed

    async def save(self, state: TrainingState, *, active: bool | None = None) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self.stage_save(pipe, state, active=active)
            try:
                await pipe.execute()
            except BaseException:
                self.drop_slot_changes()
                raise
        await self.apply_slot_changes()


    async def active_count(self) -> int:
        return int(await self._redis.scard(self._keys.active_trainings))

    async def queued_ids(self, limit: int = QUEUE_READ) -> list[str]:
        """The first ``limit`` queued trainings, oldest first."""
        return [text(raw) for raw in await self._redis.lrange(self._keys.training_queue, 0, limit - 1)]

    async def claim_slot(self, training_id: str, slots: int) -> bool:
        """Give ``training_id`` one of the deployment's ``slots``; True when it holds one (already,
        or now). Atomic, so coordinators of several partitions never take more between them, and
        in queue order: a slot goes to a training only while no more trainings queued before it
        than there are free slots wait (their partitions start them)."""
        return bool(await self._redis.eval(_CLAIM_SLOT_LUA, 2, self._keys.active_trainings,
                                           self._keys.training_queue, training_id, str(slots)))

    async def remove_queued(self, training_id: str) -> None:
        await self._redis.lrem(self._keys.training_queue, 0, training_id)

    async def publish_missing_views(self) -> int:
        """Write the view of every training stored without one (a deployment from before views
        existed); returns how many."""
        ids = cast("list[bytes]", await self._redis.zrange(self._keys.trainings, 0, -1))
        published = 0
        for training_id in (m.decode() for m in ids):
            if await self._redis.exists(self._keys.training_view(training_id)):
                continue
            state = await self.load(training_id)
            if state is not None:
                await self._redis.set(self._keys.training_view(training_id), state.view().model_dump_json())
                published += 1
        return published
