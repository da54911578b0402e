"""Buffered-asynchronous trainings (FedBuff) as transitions of the coordinator's state machine.

No rounds for agents to wait on: up to ``clients_per_round`` agents train at any time on
whatever version is current; every accepted update goes into the open buffer (the
training's ``round`` number counts buffers); a full buffer becomes an aggregation job
whose updates carry the version they were trained from, so the aggregator discounts
stale ones; while a buffer is being aggregated, new updates fill the next one.
Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation", arXiv:2106.06639.

Updates are taken through the same path as in synchronous rounds (``CheckUpdate`` then
``AcceptUpdate``, with the exactly-once marker and the agent's outcome).
"""

from __future__ import annotations

from federated_learning.coordination.effects import (
    AcceptUpdate,
    CheckUpdate,
    CloseRound,
    Effect,
    RecordOutcome,
    Refill,
    Reject,
    Save,
    SendTasks,
    StatusChanged,
    TallyBuffer,
)
from federated_learning.coordination.inputs import (
    BufferCandidates,
    BufferTallied,
    NoticeArrived,
    NoticeChecked,
)
from federated_learning.coordination.selection import round_rng, select_agents
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.coordination.tasks import build_tasks
from federated_learning.protocol.messages import Severity, TaskKind, TrainingStatus

Transition = tuple[TrainingState, list[Effect]]


def takes_notice(state: TrainingState, kind: TaskKind) -> bool:
    """Whether a notice goes to the open buffer (the final evaluation round is synchronous)."""
    return state.is_buffered and state.status is TrainingStatus.RUNNING and kind is TaskKind.TRAIN


def open_buffer_number(state: TrainingState) -> int:
    """The buffer new updates go to: the open one, or the next while one is aggregated."""
    return state.round + (1 if state.phase is RoundPhase.AGGREGATING else 0)


def refill(state: TrainingState, given: BufferCandidates, now: float) -> Transition:
    """Open buffer ``given.open_buffer`` if set; forget tasks past their deadline; give tasks to
    idle eligible agents until ``clients_per_round`` are training; then see if the buffer is full."""
    effects: list[Effect] = []
    if given.open_buffer is not None:
        state.round = given.open_buffer
        state.phase = RoundPhase.COLLECTING
        state.round_started_at = now
        effects.append(Save())
    for agent in [agent for agent, deadline in state.in_flight.items() if deadline <= now]:
        del state.in_flight[agent]
        state.in_flight_attempt.pop(agent, None)
    if not given.candidates and not state.in_flight:
        if state.status is not TrainingStatus.PAUSED:
            state.status, state.reason = TrainingStatus.PAUSED, "no live agent holds the dataset"
            effects += [Save(), StatusChanged(state.status, state.reason, state.round, Severity.WARNING)]
        return state, [*effects, TallyBuffer()]
    if state.status is TrainingStatus.PAUSED:
        state.status, state.reason = TrainingStatus.RUNNING, ""
        effects += [Save(), StatusChanged(state.status, state.reason, state.round)]
    needed = state.clients_per_round - len(state.in_flight)
    chosen = select_agents(list(given.candidates), needed, 1.0,
                           round_rng(state.training_id, state.round, state.attempt + 1), exclude=state.in_flight)
    if chosen:
        state.attempt += 1
        deadline = now + state.round_deadline_s
        state.in_flight.update(dict.fromkeys(chosen, deadline))
        state.in_flight_attempt.update(dict.fromkeys(chosen, state.attempt))
        effects += [SendTasks(build_tasks(state, chosen, TaskKind.TRAIN, deadline)), Save()]
    return state, [*effects, TallyBuffer()]


def screen_notice(state: TrainingState, given: NoticeArrived, now: float) -> Transition:
    """One task, one update: refuse a notice without a task in flight (a redelivery of an
    answered task too) or trained on too old a version; else check it like any update."""
    notice = given.notice
    if given.volunteer and notice.agent_id not in state.in_flight:
        state.in_flight[notice.agent_id] = now
        state.in_flight_attempt[notice.agent_id] = notice.attempt
    if state.in_flight_attempt.get(notice.agent_id) != notice.attempt:
        return state, [Reject("updates", "not_selected", f"no task in flight for this agent with attempt "
                              f"{notice.attempt}", notice.training_id, notice.round, notice.agent_id, Severity.INFO)]
    del state.in_flight[notice.agent_id]
    del state.in_flight_attempt[notice.agent_id]
    staleness = (state.current_version or 0) - notice.received_model_version
    if not 0 <= staleness <= state.config.max_staleness:
        detail = (f"trained on version {notice.received_model_version}; staleness {staleness} exceeds "
                  f"max_staleness {state.config.max_staleness}")
        return state, [Save(), Reject("updates", "stale_round", detail, notice.training_id, notice.round,
                                      notice.agent_id), Refill()]
    return state, [CheckUpdate(notice, given.entry_id, open_buffer_number(state))]


def take_notice(state: TrainingState, given: NoticeChecked) -> Transition:
    """Put the update in the open buffer (or refuse it), then keep agents busy."""
    notice = given.notice
    if given.problem is not None:
        return state, [Save(), Reject("updates", *given.problem, notice.training_id, notice.round,
                                      notice.agent_id), Refill()]
    return state, [AcceptUpdate(notice, given.entry_id, open_buffer_number(state)), Save(),
                   RecordOutcome(notice.agent_id, completed=True), Refill()]


def flush_if_full(state: TrainingState, given: BufferTallied) -> Transition:
    """A full open buffer becomes an aggregation job."""
    if state.phase is RoundPhase.COLLECTING and given.updates >= state.buffer_size:
        return state, [CloseRound()]
    return state, []
