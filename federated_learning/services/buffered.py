"""Buffered-asynchronous trainings (FedBuff) inside the coordinator.

No rounds for agents to wait on: up to ``clients_per_round`` agents train at any time on
whatever version is current; every accepted update goes into the open buffer (the
training's ``round`` number counts buffers); a full buffer becomes an aggregation job
whose updates carry the version they were trained from, so the aggregator discounts
stale ones; while a buffer is being aggregated, new updates fill the next one.
Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation", arXiv:2106.06639.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from federated_learning.coordination.selection import round_rng, select_agents
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.protocol.messages import (
    Severity,
    TaskKind,
    TrainingStatus,
    UpdateSubmitted,
)

if TYPE_CHECKING:
    from federated_learning.services.coordinator import Coordinator
    from federated_learning.services.rounds import UpdateContext

INBOX_MAXLEN = 1000


class BufferedRounds:
    """The asynchronous half of the coordinator; shares its store, registry and context."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def buffer_key(self, state: TrainingState) -> str:
        """The buffer new updates go to: the open one, or the next while one is aggregated."""
        number = state.round + (1 if state.phase is RoundPhase.AGGREGATING else 0)
        return self.c.keys.round_updates(state.training_id, number)

    async def open(self, state: TrainingState, buffer_number: int) -> None:
        """Start collecting buffer ``buffer_number``; keep agents busy; flush if already full."""
        state.round = buffer_number
        state.phase = RoundPhase.COLLECTING
        state.round_started_at = time.time()
        await self.refill(state)
        await self.flush_if_full(state)

    async def refill(self, state: TrainingState) -> None:
        """Give tasks to idle eligible agents until ``clients_per_round`` are training."""
        candidates = await self.c.registry.eligible(state.config.dataset, state.project)
        if not candidates and not state.in_flight:
            if state.status is not TrainingStatus.PAUSED:
                state.status, state.reason = TrainingStatus.PAUSED, "no live agent holds the dataset"
                await self.c.store.save(state)
                await self.c._emit_status(state, Severity.WARNING)
            return
        if state.status is TrainingStatus.PAUSED:
            state.status, state.reason = TrainingStatus.RUNNING, ""
            await self.c._emit_status(state)
            await self.c.store.save(state)
        needed = state.clients_per_round - len(state.in_flight)
        chosen = select_agents(candidates, needed, 1.0, round_rng(state.training_id, state.round, state.attempt + 1),
                               exclude=state.in_flight)
        if not chosen:
            return
        state.attempt += 1
        deadline = time.time() + state.round_deadline_s
        state.in_flight.update(dict.fromkeys(chosen, deadline))
        state.in_flight_attempt.update(dict.fromkeys(chosen, state.attempt))
        async with self.c.redis.pipeline(transaction=True) as pipe:
            self.c.stage_tasks(pipe, state, chosen, TaskKind.TRAIN, deadline)
            self.c.store.stage_save(pipe, state)
            await pipe.execute()

    async def on_update(self, state: TrainingState, notice: UpdateSubmitted, context: UpdateContext,
                        *, volunteer: bool = False) -> None:
        """Accept a train notice into the open buffer (or reject it), then keep agents busy."""
        if volunteer and notice.agent_id not in state.in_flight:
            state.in_flight[notice.agent_id] = time.time()
            state.in_flight_attempt[notice.agent_id] = notice.attempt
        if state.in_flight_attempt.get(notice.agent_id) != notice.attempt:
            # Also a redelivered notice of a task already answered: one task, one update.
            await self.c.ctx.reject("updates", "not_selected", "no task in flight for this agent with attempt "
                                    f"{notice.attempt}", severity=Severity.INFO, **context)
            return
        del state.in_flight[notice.agent_id]
        del state.in_flight_attempt[notice.agent_id]
        staleness = (state.current_version or 0) - notice.received_model_version
        buffer = self.buffer_key(state)
        problem: tuple[str, str] | None = None
        if not 0 <= staleness <= state.config.max_staleness:
            problem = ("stale_round", (f"trained on version {notice.received_model_version}; staleness "
                                      f"{staleness} exceeds max_staleness {state.config.max_staleness}"))
        elif await self.c.redis.hexists(buffer, notice.agent_id):
            problem = ("duplicate", "agent already has an update in this buffer")
        else:
            problem = await self.c._check_update_blob(state, notice)
        async with self.c.redis.pipeline(transaction=True) as pipe:
            if problem is None:
                pipe.hset(buffer, notice.agent_id, notice.model_dump_json())
                if notice.update_digest:
                    pipe.persist(self.c.keys.blob(notice.update_digest, notice.agent_id))
                pipe.hincrby(self.c.keys.agent_stats, f"{notice.agent_id}:completed", 1)
                pipe.hincrby(self.c.keys.agent_stats, f"{notice.agent_id}:examples", notice.num_examples)
            self.c.store.stage_save(pipe, state)
            await pipe.execute()
        if problem is not None:
            await self.c.ctx.reject("updates", problem[0], problem[1], **context)
        await self.refill(state)
        await self.flush_if_full(state)

    async def flush_if_full(self, state: TrainingState) -> None:
        if state.phase is not RoundPhase.COLLECTING:
            return
        key = self.c.keys.round_updates(state.training_id, state.round)
        if await self.c.redis.hlen(key) >= state.buffer_size:
            await self.c.close_round(state)

    async def tick(self, state: TrainingState) -> None:
        """Forget tasks past their deadline and hand out new ones."""
        now = time.time()
        expired = [agent for agent, deadline in state.in_flight.items() if deadline <= now]
        for agent in expired:
            del state.in_flight[agent]
            state.in_flight_attempt.pop(agent, None)
        if expired or state.status is TrainingStatus.PAUSED or len(state.in_flight) < state.clients_per_round:
            await self.refill(state)
