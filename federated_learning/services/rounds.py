"""The coordinator's shell around the round state machine: reads, effects, transactions.

A mixin of :class:`~federated_learning.services.coordinator.Coordinator` (it shares the
coordinator's connections and stores). Every decision is taken by
:func:`federated_learning.coordination.machine.step`; this module turns bus entries into its
inputs, writes the staged effects of one step (tasks, accepted updates, jobs, metrics and
the state) in one MULTI/EXEC, publishes its events and rejections, and runs its follow-ups
(each a read that feeds the next step). A restart at any moment resumes from a consistent state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Protocol, TypedDict, get_args

import numpy as np
import redis.asyncio as aioredis
from numpy.typing import NDArray
from prometheus_client import Counter, Histogram
from redis.asyncio.client import Pipeline

from federated_learning.bus.blobs import BlobHead, BlobMissing
from federated_learning.bus.lease import Lease
from federated_learning.bus.replies import text
from federated_learning.config import Settings
from federated_learning.coordination import effects as fx
from federated_learning.coordination.checks import (
    SignedMessage,
    check_signature,
    checked_whole_by_aggregator,
    project_mismatch,
)
from federated_learning.coordination.inputs import (
    AgentsAlive,
    AggregationOverdue,
    BufferCandidates,
    BufferTallied,
    EvaluationReported,
    FinishRequested,
    InitialModelStored,
    Input,
    KeysCollected,
    ModelRefusedBy,
    NoticeArrived,
    NoticeChecked,
    ParameterCandidates,
    ParametersArrived,
    ParametersUnusable,
    RollbackRequested,
    RollbackTarget,
    RoundCandidates,
    RoundResults,
    RoundTallied,
    RoundUpdates,
    SecureMessageArrived,
    SecureTallied,
    SharesCollected,
    UpdateRefusedBy,
    UploadersCollected,
    VersionArrived,
    VersionsScored,
)
from federated_learning.coordination.machine import step
from federated_learning.coordination.rollbacks import version_scores
from federated_learning.coordination.secure import SecurePhase
from federated_learning.coordination.secure_exchange import masked_upload_problem
from federated_learning.coordination.selection import policy_weights, under_hourly_cap
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.presets import trainer_for
from federated_learning.protocol.agents import AgentRecord
from federated_learning.protocol.banks import decode_bank_upload
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import (
    MalformedMessage,
    MemoryBankModel,
    ModelRefused,
    ModelReleased,
    PresetModel,
    RollbackTraining,
    SecureAggregationSpec,
    Severity,
    TaskKind,
    TrainingStatus,
    UpdateAccepted,
    UpdateRefused,
    UpdateSubmitted,
    VersionCommitted,
    encode,
)
from federated_learning.protocol.secure_messages import (
    MASKED_DTYPES,
    MASKED_LAYER,
    SecureKeysAdvertised,
    SecureSharesSubmitted,
    SecureUnmaskShares,
    decode_secure_agent_message,
)
from federated_learning.protocol.tensors import InvalidTensor, decode_layers, spec_of
from federated_learning.protocol.updates import check_update_layout
from federated_learning.records.agents import AgentRegistry
from federated_learning.records.model_refusals import ModelRefusal, ModelRefusals
from federated_learning.records.models import check_user_model
from federated_learning.records.secure_exchange import SecureExchange
from federated_learning.records.trainings import TrainingStore
from federated_learning.records.validation_sets import (
    READ_TIMEOUT_S,
    InvalidValidationSet,
    load_validation_set,
)
from federated_learning.records.versions import VersionIndex
from federated_learning.services.notice_batch import DuplicateFlags, NoticeBatch
from federated_learning.services.outbox import stage_to_agent
from federated_learning.services.runtime import ServiceContext
from federated_learning.types import BlobDigest

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


log = logging.getLogger(__name__)

OUTCOME_HISTORY = 50
"""Task outcomes kept per agent and training."""
_APPEND_OUTCOME_LUA = """
local history = (redis.call('HGET', KEYS[1], ARGV[1]) or '') .. ARGV[2]
local keep = tonumber(ARGV[3])
if #history > keep then history = string.sub(history, -keep) end
redis.call('HSET', KEYS[1], ARGV[1], history)
return #history
"""
ACCEPTED_NOTICE_MARKERS = "coordinator-updates"
"""`Keys.applied` namespace of the markers naming the update-stream entry a notice was accepted from."""
ACCEPTED_STREAM_MAXLEN = 100_000
"""Entries kept on the accepted-update stream; one trimmed unread only costs the aggregator's head
start (the job reads and checks that update itself)."""
ACCEPTED_NOTICE_MARKER_TTL_S = 7 * 24 * 3600
"""Lifetime of those markers. A redelivery comes at the latest when the coordinator is back up;
one arriving after the marker expired is rejected as a duplicate (counted, nothing else changes)."""

ROUNDS = Counter("fl_rounds_completed_total", "Rounds completed", ["training"])
ROLLBACKS = Counter("fl_rollbacks_total", "Rollbacks to an earlier version", ["trigger"])
ROUND_RETRIES = Counter("fl_round_retries_total", "Rounds retried with a new selection")
UPDATES_ACCEPTED = Counter("fl_updates_accepted_total", "Updates accepted")
BYTES_RECEIVED = Counter("fl_update_bytes_received_total", "Bytes of accepted update blobs")
ROUND_SECONDS = Histogram("fl_round_seconds", "Seconds from round start to committed version",
                          buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))

EVENTS = (fx.Emit, fx.StatusChanged, fx.RolledBack)
"""Effects published on the event stream, in the step's transaction when it has one."""
STAGED = get_args(fx.Staged)
"""Effects written in the step's transaction."""
BATCHED_FOLLOW_UPS = (fx.Reject, fx.CheckUpdate, fx.TallyRound, fx.TallyBuffer)
"""Follow-ups that may run while a notice batch has writes pending: they read nothing those writes
change, or read it through the batch (see :mod:`federated_learning.services.notice_batch`)."""


class UpdateContext(TypedDict):
    """The ids a rejected update notice is reported with."""

    training_id: str
    round: int
    agent_id: str


class AgentMessageOnStream(SignedMessage, Protocol):
    """What the update stream carries: signed messages of one agent about one training."""

    @property
    def training_id(self) -> str: ...

    @property
    def agent_id(self) -> str: ...


def take_over(target: TrainingState, source: TrainingState) -> None:
    """Make ``target`` hold ``source``'s values: the shell keeps one state object per training (the
    one in memory, see ``load_state``), and a step returns a new one."""
    if target is not source:
        target.__dict__.update(source.__dict__)
        object.__setattr__(target, "__pydantic_fields_set__", set(source.model_fields_set))


class RoundProtocol:
    """Round handling; the coordinator provides the attributes declared here."""

    ctx: ServiceContext
    redis: aioredis.Redis
    keys: Keys
    settings: Settings
    store: TrainingStore
    registry: AgentRegistry
    version_index: VersionIndex
    exchange: SecureExchange
    states: dict[str, TrainingState]
    refusals: ModelRefusals
    activate_queued: Callable[[], Awaitable[None]]
    lease: Lease
    batch: NoticeBatch | None = None
    """Set while the coordinator handles a read of update notices together."""
    uploads_to_keep: list[tuple[BlobDigest, str | None]]
    """(digest, agent) of the uploads staged writes accept: made permanent just before the transaction."""

    # -- the machine -------------------------------------------------------------

    async def run_step(self, state: TrainingState, event: Input) -> None:
        """Step ``state`` with ``event`` and carry out the effects; ``state`` holds the result."""
        new_state, effects = step(state, event, time.time())
        take_over(state, new_state)
        try:
            await self.carry_out(state, effects, retried=isinstance(event, AggregationOverdue))
        except BaseException:
            self.forget_states()  # what is in memory may be ahead of what was written
            raise
        if state.status.is_final:
            self.states.pop(state.training_id, None)

    async def load_state(self, training_id: str) -> TrainingState | None:
        """The training's state. The coordinator is its only writer (decision 0004), so it keeps the
        states it works on in memory and reads Redis only on a miss (a restart, a new training);
        then the agents whose update of the current round is accepted are counted as answered
        (accepting an update does not rewrite the state)."""
        state = self.states.get(training_id)
        if state is not None:
            return state
        state = await self.store.load(training_id)
        if state is None:
            return None
        if state.phase is RoundPhase.COLLECTING and not state.is_buffered:
            state.restore_accepted(sorted(text(agent) for agent in await self.redis.hkeys(
                self.keys.round_updates(training_id, state.round))))
        if not state.status.is_final:
            self.states[training_id] = state
        return state

    def forget_states(self) -> None:
        """Read every state from Redis again (after a handler failed part-way)."""
        self.states.clear()
        self.uploads_to_keep.clear()
        self.store.drop_slot_changes()

    async def carry_out(self, state: TrainingState, effects: list[fx.Effect], *, retried: bool = False) -> None:
        staged = [e for e in effects if isinstance(e, STAGED)]
        events = [e for e in effects if isinstance(e, EVENTS)]
        self.lease.check()  # only the lease holder writes a step (a standby may have taken over)
        batch = self.batch
        if batch is not None and any(not isinstance(e, (*STAGED, *EVENTS, *BATCHED_FOLLOW_UPS)) for e in effects):
            await self.flush_batch()  # a follow-up that reads what the batch wrote
            batch = None
        if batch is not None and (staged or events):
            if batch.pipe is None:
                batch.pipe = await self.fenced_pipeline()
            for write in staged:
                self._stage(batch.pipe, state, write)
                if isinstance(write, fx.AcceptUpdate):
                    batch.accept(state.training_id, write.round, write.notice.agent_id)
            for event in events:
                self._stage_event(batch.pipe, state, event)
            batch.pending_writes += len(staged) + len(events)
        elif staged or events:
            # The step's events go in the same transaction as the writes they report: a crash
            # cannot commit a round and lose its round_completed event (or publish it twice).
            async with self.redis.pipeline(transaction=bool(staged)) as pipe:
                if staged:
                    await self.lease.fence(pipe)
                for write in staged:
                    self._stage(pipe, state, write)
                for event in events:
                    self._stage_event(pipe, state, event)
                await self._execute(pipe, fenced=bool(staged))
        for effect in effects:
            if isinstance(effect, fx.AcceptUpdate):
                UPDATES_ACCEPTED.inc()
                BYTES_RECEIVED.inc(effect.notice.upload_bytes)
            elif isinstance(effect, fx.AppendMetrics):
                ROUNDS.labels(state.training_id).inc()
                ROUND_SECONDS.observe(effect.metrics.round_seconds)
            elif (isinstance(effect, fx.OpenRound) and effect.retry) or (retried and isinstance(effect, fx.CloseRound)):
                ROUND_RETRIES.inc()
            elif isinstance(effect, fx.RolledBack):
                ROLLBACKS.labels("automatic" if effect.automatic else "operator").inc()
        for other in effects:
            if not isinstance(other, STAGED) and not isinstance(other, EVENTS):
                await self._carry_out_one(state, other)

    async def flush_batch(self) -> None:
        """Execute the notice batch's pending writes (one transaction)."""
        batch = self.batch
        if batch is None or batch.pipe is None or not batch.pending_writes:
            return
        pipe, batch.pipe = batch.pipe, None
        try:
            await self._execute(pipe, fenced=True)
        finally:
            await pipe.reset()  # type: ignore[no-untyped-call]  # the connection its WATCH held
        batch.written()

    async def fenced_pipeline(self) -> Pipeline:
        """A transaction started under the lease's fence (``bus/lease.py``); reset it when done."""
        pipe = self.redis.pipeline(transaction=True)
        try:
            await self.lease.fence(pipe)
        except BaseException:
            await pipe.reset()  # type: ignore[no-untyped-call]  # the connection its WATCH holds
            raise
        return pipe

    async def _execute(self, pipe: Pipeline, *, fenced: bool) -> None:
        """Execute a step's transaction (fenced by the lease: :class:`LeaseLost` when another
        coordinator took it since), after keeping the uploads it accepts (their expiry removed).

        Outside the transaction because an upload may be a file (``bus/blob_files.py``), or on a
        cluster a key in a hash slot of its own (``protocol/keys.py``). Before it, so that an
        accepted update's upload never expires: a crash in between leaves an upload without
        expiry whose notice is delivered again.
        """
        if self.uploads_to_keep:
            keep, self.uploads_to_keep = self.uploads_to_keep, []
            await self.ctx.blobs.keep(keep)
        try:
            if fenced:
                await self.lease.execute(pipe)
            else:
                await pipe.execute()
        except BaseException:
            self.store.drop_slot_changes()
            raise
        await self.store.apply_slot_changes()

    def _stage(self, pipe: Pipeline, state: TrainingState, effect: fx.Staged) -> None:
        keys = self.keys.for_training(state.training_id)  # the step's transaction is in its cell's slot
        match effect:
            case fx.Save():
                self.store.stage_save(pipe, state, active=effect.active)
            case fx.SendTasks():
                self._stage_tasks(pipe, keys, state, effect)
            case fx.SendMessages():
                for agent_id, message in effect.messages:
                    stage_to_agent(pipe, keys, agent_id, encode(message))
            case fx.StoreSecureMessage():
                self.exchange.stage_store(pipe, state, effect.message)
            case fx.ClearRoundUpdates():
                pipe.delete(self.keys.round_updates(state.training_id, effect.round))
            case fx.AcceptUpdate():
                notice = effect.notice
                pipe.hset(self.keys.round_updates(state.training_id, effect.round), notice.agent_id,
                          notice.model_dump_json())
                pipe.set(keys.applied(ACCEPTED_NOTICE_MARKERS, effect.entry_id),
                         f"{state.training_id}/{notice.round}/{notice.agent_id}", ex=ACCEPTED_NOTICE_MARKER_TTL_S)
                if notice.kind is TaskKind.TRAIN and notice.update_digest:
                    self.uploads_to_keep.append((notice.update_digest, notice.agent_id))  # until its round commits
                    pipe.hincrby(keys.agent_stats, f"{notice.agent_id}:completed", 1)
                    pipe.hincrby(keys.agent_stats, f"{notice.agent_id}:examples", notice.num_examples)
                    if checked_whole_by_aggregator(state):
                        pipe.xadd(keys.accepted_update_stream, encode(UpdateAccepted(
                            training_id=state.training_id, round=effect.round, agent_id=notice.agent_id,
                            update_digest=notice.update_digest, model_version=notice.received_model_version)),
                            maxlen=ACCEPTED_STREAM_MAXLEN, approximate=True)
            case fx.RevokeUpdate():
                notice = effect.notice
                if effect.withdraw:
                    pipe.hdel(self.keys.round_updates(state.training_id, effect.round), notice.agent_id)
                pipe.hincrby(keys.agent_stats, f"{notice.agent_id}:completed", -1)
                pipe.hincrby(keys.agent_stats, f"{notice.agent_id}:examples", -notice.num_examples)
            case fx.ReleaseModel():
                pipe.xadd(keys.release_stream, encode(effect.release))
            case fx.RecordOutcome():
                self._stage_outcome(pipe, state.training_id, effect.agent_id, completed=effect.completed)
            case fx.WriteJob():
                pipe.xadd(keys.job_stream, encode(effect.job))
            case fx.AppendMetrics():
                pipe.rpush(keys.training_metrics(state.training_id), effect.metrics.model_dump_json())
                for agent_id, contribution in effect.contributions.items():
                    pipe.hincrbyfloat(keys.agent_contributions, agent_id, contribution)

    def _stage_tasks(self, pipe: Pipeline, keys: Keys, state: TrainingState, effect: fx.SendTasks) -> None:
        now = time.time()
        for agent_id, task in effect.tasks:
            stage_to_agent(pipe, keys, agent_id, encode(task), asked=f"{state.training_id}/{task.round}/{task.attempt}",
                           now=now)

    def _stage_event(self, pipe: Pipeline, state: TrainingState,
                     effect: fx.Emit | fx.StatusChanged | fx.RolledBack) -> None:
        match effect:
            case fx.Emit():
                self.ctx.stage_emit(pipe, effect.kind, effect.message, severity=effect.severity,
                                    training_id=state.training_id, round=state.round, agent_id=effect.agent_id,
                                    **effect.data)
            case fx.StatusChanged():
                self.ctx.stage_emit(pipe, "training_status", f"training is {effect.status.value}"
                                    + (f": {effect.reason}" if effect.reason else ""),
                                    severity=effect.severity, training_id=state.training_id, round=effect.round,
                                    status=effect.status.value, reason=effect.reason)
            case fx.RolledBack():
                self.ctx.stage_emit(pipe, "rollback", f"rolled back from version {effect.from_version} to "
                                    f"{effect.to_version}: {effect.reason}", severity=Severity.WARNING,
                                    training_id=state.training_id, round=state.round,
                                    from_version=effect.from_version, to_version=effect.to_version,
                                    automatic=effect.automatic, reason=effect.reason, at=time.time())

    async def _carry_out_one(self, state: TrainingState, effect: fx.Effect) -> None:
        match effect:
            case fx.Reject():
                await self.ctx.reject(effect.source, effect.reason, effect.detail, severity=effect.severity,
                                      training_id=effect.training_id, round=effect.round, agent_id=effect.agent_id)
            case fx.CountLate():
                notice = effect.notice
                if notice.kind is TaskKind.TRAIN:
                    await self.redis.hincrby(self.keys.for_training(notice.training_id).agent_stats,
                                             f"{notice.agent_id}:late", 1)
                    await self._discard_unused_upload(notice)
                await self.ctx.late_update(effect.detail, training_id=notice.training_id, round=notice.round,
                                           agent_id=notice.agent_id)
            case fx.DiscardUploads():
                await self._discard_committed_uploads(state, list(effect.notices))
            case fx.OpenRound():
                await self.open_round(state, effect.round, retry=effect.retry)
            case fx.CheckUpdate():
                await self._check_update(state, effect)
            case fx.TallyRound():
                await self.advance(state)
            case fx.Refill():
                await self.refill(state)
            case fx.TallyBuffer():
                await self.run_step(state, BufferTallied(await self._accepted_count(state)))
            case fx.CloseRound():
                await self.close_round(state)
            case fx.GatherResults():
                await self._gather_results(state, effect.committed)
            case fx.JudgeRollbacks():
                policy = state.config.rollback
                scores = version_scores(await self.store.metrics(state.training_id)) \
                    if policy is not None and policy.enabled else []
                await self.run_step(state, VersionsScored(tuple(scores), effect.eval_accuracy))
            case fx.ReadVersion():
                record = await self.version_index.get(state.training_id, effect.version)
                await self.run_step(state, RollbackTarget(record, effect.reason, effect.automatic,
                                                          effect.eval_accuracy))
            case fx.GatherEvaluation():
                notices = await self._round_notices(state)
                await self.run_step(state, EvaluationReported(tuple(notices)))
            case fx.TallySecure():
                await self.run_step(state, SecureTallied(await self.exchange.count(state)))
            case fx.CollectSecure():
                await self._collect_secure(state)
            case fx.AskForParameters():
                await self.ask_for_parameters(state, after_refusal=effect.after_refusal)
            case fx.CheckParameters():
                await self._check_parameters(state, effect.notice)
            case fx.ActivateQueued():
                await self.activate_queued()
            case _:
                raise TypeError(f"the coordinator has no way to carry out {effect!r}")

    # -- entry points (also used by buffered and secure rounds, rollbacks, initial models) --

    async def finish(self, state: TrainingState, status: TrainingStatus, reason: str) -> None:
        await self.run_step(state, FinishRequested(status, reason))

    async def _emit_status(self, state: TrainingState, severity: Severity = Severity.INFO) -> None:
        await self.carry_out(state, [fx.StatusChanged(state.status, state.reason, state.round, severity)])

    async def open_round(self, state: TrainingState, round_number: int, *, retry: bool = False) -> None:
        """Read who can be asked, then let the machine select agents (or pause the training)."""
        evaluating = state.status is TrainingStatus.EVALUATING
        if state.is_buffered and not evaluating:
            candidates = await self.registry.eligible(state.config.dataset, state.project)
            await self.run_step(state, BufferCandidates(tuple(candidates), open_buffer=round_number))
            return
        candidates = await self.registry.eligible(state.config.dataset, state.project)
        accepted = {text(agent) for agent in
                    await self.redis.hkeys(self.keys.round_updates(state.training_id, round_number))}
        available = candidates if evaluating else await self._within_cap(state, candidates)
        volunteers = [] if evaluating or state.config.secure_aggregation else \
            await self.registry.live_volunteers(state.config.dataset, state.project)
        weights = None if evaluating else await self._policy_weights(state, candidates)
        await self.run_step(state, RoundCandidates(
            round=round_number, retry=retry, candidates=tuple(candidates), available=tuple(available),
            volunteers=tuple(volunteers), accepted=frozenset(accepted), weights=weights))

    async def refill(self, state: TrainingState) -> None:
        """Buffered trainings: keep ``clients_per_round`` agents training, flush a full buffer."""
        candidates = await self.registry.eligible(state.config.dataset, state.project)
        await self.run_step(state, BufferCandidates(tuple(candidates)))

    async def advance(self, state: TrainingState) -> None:
        """Count the collecting round's updates; the machine decides what happens next."""
        if state.phase is not RoundPhase.COLLECTING:
            return
        batch = self.batch
        accepted = batch.accepted_count(state.training_id, state.round) if batch is not None else None
        cached = batch.volunteers.get(state.training_id) if batch is not None else None
        if accepted is None or cached is None:
            accepted, volunteers = await self._read_tally(state)
            if batch is not None:
                batch.accepted_counts[(state.training_id, state.round)] = accepted
                batch.volunteers[state.training_id] = volunteers
                accepted = batch.accepted_count(state.training_id, state.round)
                assert accepted is not None
        else:
            volunteers = cached
        await self.run_step(state, RoundTallied(accepted, volunteers))

    async def _read_tally(self, state: TrainingState) -> tuple[int, tuple[str, ...]]:
        """The round's accepted updates in Redis and the live volunteers it may wait for."""
        evaluating = state.status is TrainingStatus.EVALUATING
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip per tally
            pipe.hlen(self.keys.round_updates(state.training_id, state.round))
            pipe.smembers(self.keys.agent_volunteers)
            accepted, indexed = await pipe.execute()
        volunteers = [] if evaluating or state.secure is not None else \
            await self.registry.live_volunteers(state.config.dataset, state.project, indexed=indexed)
        return int(accepted), tuple(volunteers)

    async def _accepted_count(self, state: TrainingState) -> int:
        """The current round's accepted updates, the pending ones of a notice batch included."""
        batch = self.batch
        if batch is not None:
            count = batch.accepted_count(state.training_id, state.round)
            if count is not None:
                return count
        read = int(await self.redis.hlen(self.keys.round_updates(state.training_id, state.round)))
        if batch is None:
            return read
        batch.accepted_counts[(state.training_id, state.round)] = read
        return read + len(batch.accepted_here.get((state.training_id, state.round), ()))

    async def close_round(self, state: TrainingState) -> None:
        """Read the accepted notices (and older versions' digests, the secure spec) for the job."""
        notices = await self._round_notices(state)
        bases: dict[int, str] = {}
        for version in {n.received_model_version for n in notices} - {state.current_version}:
            record = await self.version_index.get(state.training_id, version)
            if record is not None:
                bases[version] = record.model_digest
        await self.run_step(state, RoundUpdates(tuple(notices), bases, await self._secure_job_spec(state)))

    async def _secure_job_spec(self, state: TrainingState) -> SecureAggregationSpec | None:
        """What the aggregator needs to remove the masks of the secure round being closed."""
        secure = state.secure
        if secure is None:
            return None
        assert secure.session is not None
        responses = await self.exchange.stored(state, SecurePhase.UNMASK, SecureUnmaskShares)
        return SecureAggregationSpec(session=secure.session, attempt=secure.attempt,
                                     share_senders=secure.share_senders, responders=[r.agent_id for r in responses])

    async def _collect_secure(self, state: TrainingState) -> None:
        """What the completed phase produced, for the machine to start the next one."""
        assert state.secure is not None
        phase = state.secure.phase
        if phase is SecurePhase.KEYS:
            advertised = await self.exchange.stored(state, phase, SecureKeysAdvertised)
            await self.run_step(state, KeysCollected(tuple(advertised), os.urandom(16).hex()))
        elif phase is SecurePhase.SHARES:
            submissions = await self.exchange.stored(state, phase, SecureSharesSubmitted)
            await self.run_step(state, SharesCollected(tuple(submissions)))
        elif phase is SecurePhase.MASKED:
            await self.run_step(state, UploadersCollected(tuple(await self.exchange.uploaders(state))))

    async def on_secure_message(self, fields: dict[bytes, bytes]) -> None:
        try:
            message = decode_secure_agent_message(fields)
        except MalformedMessage as exc:
            await self.ctx.reject("updates", "malformed", exc.reason)
            return
        sender = await self.check_sender(message, {"training_id": message.training_id, "round": message.round,
                                                   "agent_id": message.agent_id})
        if sender is not None:
            state, _agent = sender
            owners = await self.exchange.key_owners(state, message)
            await self.run_step(state, SecureMessageArrived(message, owners))

    async def _round_notices(self, state: TrainingState) -> list[UpdateSubmitted]:
        raw = await self.redis.hgetall(self.keys.round_updates(state.training_id, state.round))
        return [UpdateSubmitted.model_validate_json(v) for v in raw.values()]

    # -- update notices ----------------------------------------------------------

    async def on_update(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        notice = await self.ctx.decoded(UpdateSubmitted, fields, "updates")
        if notice is None:
            return
        await self.on_notice(entry_id, notice)

    async def on_notice(self, entry_id: bytes, notice: UpdateSubmitted) -> None:
        context: UpdateContext = {"training_id": notice.training_id, "round": notice.round,
                                  "agent_id": notice.agent_id}
        sender = await self.check_sender(notice, context)
        if sender is None:
            return
        state, agent = sender
        if notice.kind is TaskKind.PARAMETERS:
            await self.run_step(state, ParametersArrived(notice, agent.volunteer))
        else:
            await self.run_step(state, NoticeArrived(notice, entry_id.decode(), agent.volunteer))

    async def _check_update(self, state: TrainingState, check: fx.CheckUpdate) -> None:
        """(training, round, agent) is accepted once. The entry it was accepted from comes back
        only as a redelivery (a crash before the ack): dropped silently. Any other entry is a
        replay of the signed notice or a second upload, and is refused. Else the blob is checked."""
        notice = check.notice
        problem: tuple[str, str] | None
        flags = await self._duplicate_flags(state.training_id, check.round, notice.agent_id, check.entry_id)
        if flags.accepted:
            if flags.from_this_entry:
                return
            problem = ("duplicate", (f"{notice.kind.value} notice for round {notice.round} already accepted from "
                                     f"another entry; entry {check.entry_id} is a replay or a second upload"))
        else:
            problem = await self._check_update_blob(state, notice)
        await self.run_step(state, NoticeChecked(notice, check.entry_id, problem))

    async def _duplicate_flags(self, training_id: str, round_number: int, agent_id: str,
                               entry_id: str) -> DuplicateFlags:
        batch = self.batch
        if batch is not None:
            if batch.accepted_in_batch(training_id, round_number, agent_id):
                return DuplicateFlags(accepted=True, from_this_entry=False)  # an entry is handled once per batch
            cached = batch.duplicates.get((training_id, round_number, agent_id, entry_id))
            if cached is not None:
                return cached
        async with self.redis.pipeline(transaction=False) as pipe:
            self.stage_duplicate_read(pipe, training_id, round_number, agent_id, entry_id)
            accepted, marked = await pipe.execute()
        return DuplicateFlags(bool(accepted), bool(marked))

    def stage_duplicate_read(self, pipe: Pipeline, training_id: str, round_number: int, agent_id: str,
                             entry_id: str) -> None:
        """Queue the two reads of :class:`DuplicateFlags` (accepted in the round, accepted from the entry)."""
        pipe.hexists(self.keys.round_updates(training_id, round_number), agent_id)
        pipe.exists(self.keys.for_training(training_id).applied(ACCEPTED_NOTICE_MARKERS, entry_id))

    async def on_update_refused(self, _id: bytes, fields: dict[bytes, bytes]) -> None:
        """The aggregator read an accepted update whole and found it invalid."""
        refusal = await self.ctx.decoded(UpdateRefused, fields, "refused")
        if refusal is None:
            return
        state = await self.load_state(refusal.training_id)
        if state is None:  # the training ended and was forgotten: still counted
            await self.ctx.reject("updates", refusal.reason, refusal.detail, training_id=refusal.training_id,
                                  round=refusal.round, agent_id=refusal.agent_id)
            return
        raw = await self.redis.hget(self.keys.round_updates(state.training_id, refusal.round), refusal.agent_id)
        accepted = UpdateSubmitted.model_validate_json(raw) if raw is not None else None
        await self.run_step(state, UpdateRefusedBy(refusal, accepted))

    # -- committed versions --------------------------------------------------------

    async def on_version(self, _id: bytes, fields: dict[bytes, bytes]) -> None:
        committed = await self.ctx.decoded(VersionCommitted, fields, "versions")
        if committed is None:
            return
        state = await self.load_state(committed.training_id)
        if state is not None:
            await self.run_step(state, VersionArrived(committed))

    async def _gather_results(self, state: TrainingState, committed: VersionCommitted) -> None:
        notices = await self._round_notices(state)
        release_raw = await self.redis.hget(self.keys.release(state.training_id), str(state.round))
        release = ModelReleased.model_validate_json(release_raw) if release_raw else None
        server = await self._server_validation(state, committed)
        await self.run_step(state, RoundResults(committed, tuple(notices), release, server))

    async def ask_for_parameters(self, state: TrainingState, *, after_refusal: bool = False) -> None:
        """A ``from_first_agent`` training: let the machine ask a live agent for its parameters."""
        candidates = await self.registry.eligible(state.config.dataset, state.project)
        await self.run_step(state, ParameterCandidates(tuple(candidates), after_refusal))

    async def _check_parameters(self, state: TrainingState, notice: UpdateSubmitted) -> None:
        """An agent's parameters become version 0, or its refusal is kept."""
        assert notice.update_digest is not None
        try:
            data = await self.ctx.blobs.get(notice.update_digest, owner=notice.agent_id)
            layers = check_user_model(data, max_bytes=self.settings.max_blob_bytes)
        except (BlobMissing, InvalidTensor) as exc:
            reason, detail = (exc.reason, exc.detail) if isinstance(exc, InvalidTensor) else ("blob_missing", str(exc))
            await self.record_refusal(state, notice.agent_id, reason,
                                      f"the parameters of agent {notice.agent_id} cannot be a model: {detail}",
                                      source="coordinator")
            await self.run_step(state, ParametersUnusable(notice.agent_id, notice.attempt))
            return
        digest = await self.ctx.blobs.put(data)
        await self.run_step(state, InitialModelStored(digest, spec_of(layers), from_agent=notice.agent_id))

    async def on_model_refused(self, fields: dict[bytes, bytes]) -> None:
        """An agent cannot train the training's model: keep the reason where the operator looks."""
        refused = await self.ctx.decoded(ModelRefused, fields, "updates")
        if refused is None:
            return
        sender = await self.check_sender(refused, {"training_id": refused.training_id, "round": refused.round,
                                                   "agent_id": refused.agent_id})
        if sender is None:
            return
        state, _agent = sender
        if state.status.is_final:
            return
        await self.record_refusal(state, refused.agent_id, refused.reason, refused.detail, source="agent")
        await self.run_step(state, ModelRefusedBy(refused))

    async def record_refusal(self, state: TrainingState, agent_id: str, reason: str, detail: str, *,
                             source: str) -> None:
        """Keep the refusal and report it once per (agent, reason): an agent asked every round
        does not raise an event every round."""
        if await self.refusals.add(state.training_id, ModelRefusal(agent_id=agent_id, reason=reason,
                                                                   detail=detail, source=source)):
            await self.ctx.emit("model_refused", detail, severity=Severity.WARNING,
                                training_id=state.training_id, round=state.round, agent_id=agent_id, reason=reason)

    async def on_rollback_request(self, command: RollbackTraining, request_id: str) -> None:
        """An operator's rollback (``request_id``: its control entry, so a redelivery is not
        applied twice)."""
        state = await self.load_state(command.training_id)
        if state is None:
            await self.ctx.reject("control", "unknown_training", f"no running training '{command.training_id}'",
                                  training_id=command.training_id)
            return
        record = await self.version_index.get(state.training_id, command.version)
        await self.run_step(state, RollbackRequested(command, request_id, record))

    # -- the clock -----------------------------------------------------------------

    async def aggregation_overdue(self, state: TrainingState) -> None:
        await self.run_step(state, AggregationOverdue())

    async def _report_dropouts(self, state: TrainingState, alive: set[str]) -> None:
        await self.run_step(state, AgentsAlive(frozenset(alive)))

    # -- reads ---------------------------------------------------------------------

    async def check_sender(self, message: AgentMessageOnStream, context: UpdateContext
                           ) -> tuple[TrainingState, AgentRecord] | None:
        """The training and the agent of a message on the update stream, or None after rejecting
        it: unknown training or agent, an agent of another project, or a bad signature."""
        state = await self.load_state(message.training_id)
        if state is None:
            await self.ctx.reject("updates", "unknown_training", message.training_id, **context)
            return None
        agent = await self.registry.get(message.agent_id)
        if agent is None:
            await self.ctx.reject("updates", "unknown_agent", message.agent_id, **context)
            return None
        mismatch = project_mismatch(agent.project, state.project)
        problem = ("wrong_project", mismatch) if mismatch is not None else \
            check_signature(message, agent.public_key, self.settings.require_signed_updates)
        if problem is not None:
            await self.ctx.reject("updates", problem[0], problem[1], **context)
            return None
        return state, agent

    async def _check_update_blob(self, state: TrainingState, notice: UpdateSubmitted) -> tuple[str, str] | None:
        """Reason and detail when the update declares too many examples or its blob is missing or
        invalid, else None."""
        if notice.kind is TaskKind.EVALUATE or notice.update_digest is None:
            return None
        if notice.num_examples > state.config.max_examples_per_update:
            return ("too_many_examples", (f"the update declares {notice.num_examples} examples; the training "
                                          f"weighs one update by at most {state.config.max_examples_per_update} "
                                          "(max_examples_per_update)"))
        if state.config.secure_aggregation and not state.is_buffered:
            return await self._check_masked_upload(state, notice)
        spec = state.config.model
        try:
            if isinstance(spec, MemoryBankModel):
                data = await self.ctx.blobs.get(notice.update_digest, owner=notice.agent_id)
                decode_bank_upload(data, spec, max_bytes=self.settings.max_blob_bytes)
            else:
                # The header only: the aggregator reads the update whole, checks its hash and values
                # and refuses it there (decision 0012), so the bytes cross the bus once.
                head = await self._update_head(notice.update_digest, notice.agent_id)
                check_update_layout(head.head, head.size, state.layer_spec, max_bytes=self.settings.max_blob_bytes)
        except BlobMissing:
            return "blob_missing", f"no blob {notice.update_digest}"
        except InvalidTensor as exc:
            return exc.reason, exc.detail
        return None

    async def _update_head(self, digest: str, agent_id: str) -> BlobHead:
        batch = self.batch
        cached = batch.heads.get((digest, agent_id)) if batch is not None else None
        return cached if cached is not None else await self.ctx.blobs.head(digest, owner=agent_id)

    async def _check_masked_upload(self, state: TrainingState, notice: UpdateSubmitted) -> tuple[str, str] | None:
        """Why a masked upload is refused (wrong phase, not a share sender, bad blob), or None."""
        problem = masked_upload_problem(state, notice)
        if problem is not None:
            return problem
        assert state.secure is not None and state.secure.session is not None and notice.update_digest is not None
        try:
            layers = decode_layers(await self.ctx.blobs.get(notice.update_digest, owner=notice.agent_id),
                                   max_bytes=self.settings.max_blob_bytes, allowed_dtypes=MASKED_DTYPES)
        except BlobMissing:
            return "blob_missing", f"no blob {notice.update_digest}"
        except InvalidTensor as exc:
            return exc.reason, exc.detail
        shape = [tuple(layer.shape) for layer in layers.values()]
        length = state.secure.session.vector_length
        if list(layers) != [MASKED_LAYER] or shape != [(length,)]:
            return "bad_shape", (f"a masked update is one uint32 tensor '{MASKED_LAYER}' of {length} values; "
                                 f"got {dict(zip(layers, shape, strict=True))}")
        return None

    async def _within_cap(self, state: TrainingState, candidates: list[str]) -> list[str]:
        cap = state.config.max_tasks_per_agent_per_hour
        if cap is None:
            return candidates
        return under_hourly_cap(candidates, await self.registry.asked_within(candidates, 3600.0, time.time()), cap)

    async def _policy_weights(self, state: TrainingState, candidates: list[str]) -> dict[str, float] | None:
        policy = state.config.selection
        if policy == "random":
            return None
        sizes = {record.agent_id: record.datasets.get(state.config.dataset, 0)
                 for record in await self.registry.records(candidates)}
        stats = await self.registry.statistics() if policy in ("reliability", "contribution") else {}
        return policy_weights(policy, candidates, sizes, stats)

    async def _discard_committed_uploads(self, state: TrainingState, notices: list[UpdateSubmitted]) -> None:
        """The version is committed: its round's uploads are not read again, so they leave the
        bus now (a crash before this leaves them to their upload TTL). An agent that sent the same
        bytes again (the same version trained the same way, as a buffered training may ask) shares
        the blob with the next round's update: that one is kept."""
        following = await self.redis.hvals(self.keys.round_updates(state.training_id, state.round + 1))
        still_needed = {(n.update_digest, n.agent_id) for n in map(UpdateSubmitted.model_validate_json, following)}
        await self.ctx.blobs.discard([(n.update_digest, n.agent_id) for n in notices
                                      if n.update_digest and (n.update_digest, n.agent_id) not in still_needed])

    async def _discard_unused_upload(self, notice: UpdateSubmitted) -> None:
        """Free a late update's blob now rather than at its upload TTL (a day): late updates come
        every round by design. Not when the agent has an accepted update in that round (the same
        blob, sent twice, may be in the aggregator's hands)."""
        accepted = self.keys.round_updates(notice.training_id, notice.round)
        if notice.update_digest and not await self.redis.hexists(accepted, notice.agent_id):
            await self.ctx.blobs.discard([(notice.update_digest, notice.agent_id)])

    def _stage_outcome(self, pipe: Pipeline, training_id: str, agent_id: str, *, completed: bool) -> None:
        """Append to the agent's recent outcomes in the training (the monitor's failure-rate rule),
        in the server: no read-modify-write round trip, and in the step's transaction."""
        pipe.eval(_APPEND_OUTCOME_LUA, 1, self.keys.agent_outcomes(training_id), agent_id,
                  "1" if completed else "0", str(OUTCOME_HISTORY))

    async def _server_validation(self, state: TrainingState, committed: VersionCommitted
                                 ) -> tuple[float, float] | None:
        """(accuracy, loss) of the committed version on the training's server-side validation set."""
        path = state.config.validation_data
        if path is None:
            return None
        spec = state.config.model
        if not isinstance(spec, PresetModel):
            return None  # refused at start: the server cannot run the user's model
        x, y = await self.validation_set(path, spec)
        layers = decode_layers(await self.ctx.blobs.get(committed.model_digest),
                               max_bytes=self.settings.max_blob_bytes)
        result = await asyncio.to_thread(trainer_for(spec).evaluate, layers, x, y)
        return float(result.accuracy), float(result.loss)

    async def validation_set(self, name: str, spec: PresetModel) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """The training's validation file, read off the event loop and within READ_TIMEOUT_S."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(
                load_validation_set, self.settings.validation_folder, name, spec.num_features, spec.num_classes),
                READ_TIMEOUT_S)
        except TimeoutError as exc:
            raise InvalidValidationSet(f"validation data {name!r} was not read within {READ_TIMEOUT_S:.0f}s") from exc

    async def check_validation_data(self, state: TrainingState) -> str | None:
        """Why the training's validation file cannot score its versions, or None."""
        spec, name = state.config.model, state.config.validation_data
        if name is None or not isinstance(spec, PresetModel):
            return None
        try:
            await self.validation_set(name, spec)
        except InvalidValidationSet as exc:
            return str(exc)
        return None
