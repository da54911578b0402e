"""The synchronous round protocol of the coordinator: select, collect, aggregate, commit.

A mixin of :class:`~federated_learning.services.coordinator.Coordinator` (it shares the
coordinator's connections and stores): opening a round with over-selection, accepting or
rejecting update notices, deciding when to aggregate, retry or give up, writing the
aggregation job, completing a round when its version is committed, and the final
evaluation round. Every state change is written with its side effects in one MULTI/EXEC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypedDict

import numpy as np
import redis.asyncio as aioredis
from numpy.typing import NDArray
from prometheus_client import Counter, Histogram
from redis.asyncio.client import Pipeline

from agents.trainers import trainer_for
from federated_learning.bus.blobs import BlobMissing
from federated_learning.bus.replies import text
from federated_learning.config import Settings
from federated_learning.coordination.checks import (
    SignedMessage,
    check_signature,
    notice_metrics,
    project_mismatch,
    strategy_params,
)
from federated_learning.coordination.rounds import RoundDecision, decide_round, summarize_notices
from federated_learning.coordination.secure import SecureRoundState
from federated_learning.coordination.selection import (
    policy_weights,
    round_rng,
    select_agents,
    under_hourly_cap,
)
from federated_learning.coordination.state import AgentRecord, RoundPhase, TrainingState
from federated_learning.privacy.mechanisms import AdaptiveClipper
from federated_learning.privacy.release import (
    adaptive_count_noise_std,
    clip_norm_type,
    local_laplace_scale,
    local_noise_std,
)
from federated_learning.protocol.banks import decode_bank_upload
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import (
    AggregationJob,
    Evaluation,
    MalformedMessage,
    MemoryBankModel,
    ModelReleased,
    PresetModel,
    RoundMetrics,
    Severity,
    Task,
    TaskKind,
    TrainingStatus,
    UpdateRef,
    UpdateSubmitted,
    VersionCommitted,
    decode,
    encode,
)
from federated_learning.protocol.tensors import InvalidTensor, decode_layers
from federated_learning.protocol.updates import decode_update
from federated_learning.records.agents import AgentRegistry
from federated_learning.records.trainings import TrainingStore
from federated_learning.records.validation_sets import (
    READ_TIMEOUT_S,
    InvalidValidationSet,
    load_validation_set,
)
from federated_learning.services.runtime import ServiceContext

if TYPE_CHECKING:
    from federated_learning.services.buffered import BufferedRounds
    from federated_learning.services.initial_models import InitialModels
    from federated_learning.services.rollbacks import Rollbacks
    from federated_learning.services.secure_rounds import SecureRounds

log = logging.getLogger(__name__)

INBOX_MAXLEN = 1000
OUTCOME_HISTORY = 50
"""Task outcomes kept per agent and training."""
ASKED_AT_HORIZON_S = 3600.0
"""How long task times are kept per agent (the hourly cap looks back this far)."""
ACCEPTED_NOTICE_MARKERS = "coordinator-updates"
"""`Keys.applied` namespace of the markers naming the update-stream entry a notice was accepted from."""
ACCEPTED_NOTICE_MARKER_TTL_S = 7 * 24 * 3600
"""Lifetime of those markers. A redelivery comes at the latest when the coordinator is back up;
one arriving after the marker expired is rejected as a duplicate (counted, nothing else changes)."""

ROUNDS = Counter("fl_rounds_completed_total", "Rounds completed", ["training"])
ROUND_RETRIES = Counter("fl_round_retries_total", "Rounds retried with a new selection")
UPDATES_ACCEPTED = Counter("fl_updates_accepted_total", "Updates accepted")
BYTES_RECEIVED = Counter("fl_update_bytes_received_total", "Bytes of accepted update blobs")
ROUND_SECONDS = Histogram("fl_round_seconds", "Seconds from round start to committed version",
                          buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))


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


class RoundProtocol:
    """Round handling; the coordinator provides the attributes declared here."""

    ctx: ServiceContext
    redis: aioredis.Redis
    keys: Keys
    settings: Settings
    store: TrainingStore
    registry: AgentRegistry
    buffered: BufferedRounds
    rollbacks: Rollbacks
    secure: SecureRounds
    initial: InitialModels
    activate_queued: Callable[[], Awaitable[None]]

    async def finish(self, state: TrainingState, status: TrainingStatus, reason: str) -> None:
        state.status = status
        state.reason = reason
        state.phase = RoundPhase.IDLE
        await self.store.save(state, active=False)
        severity = Severity.INFO if status is TrainingStatus.COMPLETED else Severity.WARNING
        await self._emit_status(state, severity)
        if status is TrainingStatus.COMPLETED:
            await self.ctx.emit(
                "training_completed", f"training completed after {state.completed_rounds} rounds",
                training_id=state.training_id, round=state.round,
                final_version=state.current_version,
                final_evaluation=state.final_evaluation.model_dump() if state.final_evaluation else None)
        await self.activate_queued()

    async def _emit_status(self, state: TrainingState, severity: Severity = Severity.INFO) -> None:
        await self.ctx.emit("training_status", f"training is {state.status.value}"
                            + (f": {state.reason}" if state.reason else ""),
                            severity=severity, training_id=state.training_id, round=state.round,
                            status=state.status.value, reason=state.reason)

    # -- agents ----------------------------------------------------------------

    async def open_round(self, state: TrainingState, round_number: int, *, retry: bool = False) -> None:
        """Select agents and send them their tasks; pause when too few are alive."""
        evaluating = state.status is TrainingStatus.EVALUATING
        if state.is_buffered and not evaluating:
            await self.buffered.open(state, round_number)
            return
        candidates = await self.registry.eligible(state.config.dataset, state.project)
        if round_number != state.round:
            state.selected, state.responded, state.dropped, state.retries = [], [], [], 0
            state.attempt, state.aggregation_attempts = 0, 0
        state.round = round_number
        accepted = await self.redis.hlen(self.keys.round_updates(state.training_id, round_number))
        available = candidates if evaluating else await self._within_cap(state, candidates)
        # Live volunteers (plain-HTTP clients) are never asked, but they count: a round of bots alone runs.
        volunteers = [] if evaluating or state.config.secure_aggregation else \
            await self.registry.live_volunteers(state.config.dataset, state.project)
        if not evaluating and len(available) + len(volunteers) < state.min_clients:
            if state.status is not TrainingStatus.PAUSED:
                state.status = TrainingStatus.PAUSED
                state.reason = (f"only {len(available) + len(volunteers)} agents alive with dataset "
                                f"'{state.config.dataset}'" + (
                                    f" and under the hourly cap of {state.config.max_tasks_per_agent_per_hour} tasks"
                                    if len(available) < len(candidates) else "")
                                + f"; need {state.min_clients}")
                state.phase = RoundPhase.IDLE
                await self.store.save(state)
                await self._emit_status(state, Severity.WARNING)
            return
        if state.status is TrainingStatus.PAUSED:
            state.status, state.reason = TrainingStatus.RUNNING, ""
            await self._emit_status(state)
        state.attempt += 1
        state.secure = SecureRoundState(attempt=state.attempt) if state.config.secure_aggregation and not evaluating else None
        rng = round_rng(state.training_id, round_number, state.attempt)
        if evaluating:
            chosen = [a for a in candidates if a not in state.selected]
        else:
            # A retry asks agents not asked before; when too few are left (after an outage longer
            # than the deadline, say) it asks again the live agents whose update is still missing.
            wanted = state.clients_per_round - accepted
            fresh = [agent for agent in available if agent not in state.selected]
            exclude = state.selected if len(fresh) >= wanted else \
                [text(agent) for agent in await self.redis.hkeys(self.keys.round_updates(state.training_id,
                                                                                         round_number))]
            chosen = select_agents(available, wanted, state.config.over_selection, rng, exclude=exclude,
                                   weights=await self._policy_weights(state, candidates))
        now = time.time()
        state.selected = sorted(set(state.selected) | set(chosen))
        state.phase = RoundPhase.COLLECTING
        state.deadline_at = now + state.round_deadline_s
        if not retry:
            state.round_started_at = now
        task_kind = TaskKind.EVALUATE if evaluating else TaskKind.TRAIN
        async with self.redis.pipeline(transaction=True) as pipe:
            self.stage_tasks(pipe, state, chosen, task_kind, state.deadline_at)
            self.store.stage_save(pipe, state)
            await pipe.execute()
        await self.ctx.emit("round_started" if not retry else "round_retried",
                            f"{task_kind.value} round {round_number} attempt {state.attempt}: "
                            f"asked {len(chosen)} of {len(candidates)} eligible agents",
                            training_id=state.training_id, round=round_number,
                            attempt=state.attempt, selected=len(chosen), eligible=len(candidates))

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

    def stage_tasks(self, pipe: Pipeline, state: TrainingState, agents: list[str], kind: TaskKind,
                    deadline_at: float) -> None:
        """Add a task on the current version to each agent's inbox (and count it) to ``pipe``."""
        assert state.current_digest is not None and state.current_version is not None
        now = time.time()
        settings = state.config.local.model_copy(update={
            "clip_norm": state.clip_norm, "clip_norm_type": clip_norm_type(state),
            "local_noise_std": local_noise_std(state), "local_laplace_scale": local_laplace_scale(state)})
        for agent_id in agents:
            task = Task(kind=kind, training_id=state.training_id, round=state.round, attempt=state.attempt,
                        dataset=state.config.dataset, model=state.config.model,
                        model_digest=state.current_digest, model_version=state.current_version,
                        settings=settings, deadline_at=deadline_at,
                        secure=state.secure is not None and kind is TaskKind.TRAIN)
            pipe.xadd(self.keys.inbox_stream(agent_id), encode(task),
                      maxlen=INBOX_MAXLEN, approximate=True)
            pipe.hincrby(self.keys.agent_stats, f"{agent_id}:asked", 1)
            asked_at = self.keys.agent_asked_at(agent_id)
            pipe.zadd(asked_at, {f"{state.training_id}/{state.round}/{state.attempt}": now})
            pipe.zremrangebyscore(asked_at, 0, now - ASKED_AT_HORIZON_S)

    async def on_update(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            notice = decode(UpdateSubmitted, fields)
        except MalformedMessage as exc:
            await self.ctx.reject("updates", "malformed", exc.reason)
            return
        context: UpdateContext = {"training_id": notice.training_id, "round": notice.round,
                                  "agent_id": notice.agent_id}
        sender = await self.check_sender(notice, context)
        if sender is None:
            return
        state, agent = sender
        if notice.kind is TaskKind.PARAMETERS:
            await self.initial.on_parameters(state, notice, volunteer=agent.volunteer)
            return
        if state.is_buffered and state.status is TrainingStatus.RUNNING and notice.kind is TaskKind.TRAIN:
            await self.buffered.on_update(state, notice, context, volunteer=agent.volunteer)
            return
        expected_kind = TaskKind.EVALUATE if state.status is TrainingStatus.EVALUATING else TaskKind.TRAIN
        # A volunteer that syncs while the training waits for agents (PAUSED) has sent an update of
        # the round that opens next: it is kept for that round, not refused as late.
        waiting_round = agent.volunteer and state.status is TrainingStatus.PAUSED and state.secure is None
        closed = notice.round < state.round or (
            notice.round == state.round and state.phase is not RoundPhase.COLLECTING and not waiting_round)
        if closed or notice.round != state.round or notice.kind is not expected_kind:
            where = (f"{notice.kind.value} notice for round {notice.round}; training is in round "
                     f"{state.round} ({state.status.value}/{state.phase.value})")
            final_evaluation = notice.round == state.round and state.config.kind != "memory_bank" and \
                state.status in (TrainingStatus.EVALUATING, TrainingStatus.SAVING, TrainingStatus.COMPLETED)
            asked = TaskKind.EVALUATE if final_evaluation else TaskKind.TRAIN
            # Over-selection asks more agents than a round waits for, so the slowest answer what
            # they were asked just after the round closed: by design, counted as late, not rejected.
            if closed and notice.round >= state.round - 1 and notice.kind is asked:
                if notice.kind is TaskKind.TRAIN:
                    await self.redis.hincrby(self.keys.agent_stats, f"{notice.agent_id}:late", 1)
                    await self._discard_unused_upload(notice)
                await self.ctx.late_update(where, **context)
                return
            await self.ctx.reject("updates", "stale_round", where, **context)
            return
        if notice.agent_id not in state.selected:
            # Volunteers (plain-HTTP clients) send unasked; an update trained on a recent
            # version is re-based onto the current one by the aggregator (close_round names its base).
            current = state.current_version or 0
            recent = current - state.config.max_staleness <= notice.received_model_version <= current
            if not (agent.volunteer and recent and state.secure is None):
                await self.ctx.reject("updates", "not_selected",
                                      f"agent was not asked in round {notice.round}", **context)
                return
            state.selected = sorted({*state.selected, notice.agent_id})
        updates_key = self.keys.round_updates(state.training_id, state.round)
        marker = self.keys.applied(ACCEPTED_NOTICE_MARKERS, entry_id.decode())
        if await self.redis.hexists(updates_key, notice.agent_id):
            # (training, round, agent) is accepted once. The entry it was accepted from comes
            # back only as a redelivery (a crash before the ack): silent. Any other entry is a
            # replay of the signed notice or a second upload, and is refused.
            if not await self.redis.exists(marker):
                await self.ctx.reject("updates", "duplicate",
                                      f"{notice.kind.value} notice for round {notice.round} already accepted "
                                      f"from another entry; entry {entry_id.decode()} is a replay or a "
                                      f"second upload", **context)
            return
        problem = await self._check_update_blob(state, notice)
        if notice.agent_id not in state.responded:
            state.responded.append(notice.agent_id)
        if problem is not None:
            await self.store.save(state)
            await self.ctx.reject("updates", problem[0], problem[1], **context)
        else:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(updates_key, notice.agent_id, notice.model_dump_json())
                pipe.set(marker, f"{state.training_id}/{state.round}/{notice.agent_id}",
                         ex=ACCEPTED_NOTICE_MARKER_TTL_S)
                if notice.kind is TaskKind.TRAIN and notice.update_digest:
                    pipe.persist(self.keys.blob(notice.update_digest, notice.agent_id))  # kept until its round commits
                    pipe.hincrby(self.keys.agent_stats, f"{notice.agent_id}:completed", 1)
                    pipe.hincrby(self.keys.agent_stats, f"{notice.agent_id}:examples", notice.num_examples)
                self.store.stage_save(pipe, state)
                await pipe.execute()
            if notice.kind is TaskKind.TRAIN:
                await self.record_outcome(state.training_id, notice.agent_id, completed=True)
            UPDATES_ACCEPTED.inc()
            BYTES_RECEIVED.inc(notice.upload_bytes)
        await self.advance(state)

    async def check_sender(self, message: AgentMessageOnStream, context: UpdateContext
                           ) -> tuple[TrainingState, AgentRecord] | None:
        """The training and the agent of a message on the update stream, or None after rejecting
        it: unknown training or agent, an agent of another project, or a bad signature."""
        state = await self.store.load(message.training_id)
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
            return await self.secure.check_upload(state, notice)
        spec = state.config.model
        try:
            data = await self.ctx.blobs.get(notice.update_digest, owner=notice.agent_id)
            if isinstance(spec, MemoryBankModel):
                decode_bank_upload(data, spec, max_bytes=self.settings.max_blob_bytes)
            else:
                decode_update(data, state.layer_spec, max_bytes=self.settings.max_blob_bytes)
        except BlobMissing:
            return "blob_missing", f"no blob {notice.update_digest}"
        except InvalidTensor as exc:
            return exc.reason, exc.detail
        return None

    async def advance(self, state: TrainingState) -> None:
        """Decide what a collecting round does next, and do it."""
        if state.phase is not RoundPhase.COLLECTING:
            return
        if state.secure is not None and state.status is not TrainingStatus.EVALUATING:
            await self.secure.advance(state)
            return
        updates_key = self.keys.round_updates(state.training_id, state.round)
        accepted = await self.redis.hlen(updates_key)
        evaluating = state.status is TrainingStatus.EVALUATING
        # Live volunteers (plain-HTTP clients) may still send an update for this round; one that
        # let the last round it was waited for close without its update is not waited for again.
        expected = set(state.selected)
        awaited: set[str] = set()
        if not evaluating:
            awaited = set(await self.registry.live_volunteers(state.config.dataset, state.project)) - expected
            awaited -= set(state.silent_volunteers) - set(state.responded)
            expected |= awaited
        decision = decide_round(
            accepted=accepted, responded=len(state.responded), selected=len(expected),
            target=len(state.selected) if evaluating else state.clients_per_round,
            min_clients=0 if evaluating else state.min_clients,
            now=time.time(), deadline_at=state.deadline_at,
            attempt=state.retries + 1, max_attempts=state.config.max_round_attempts,
        )
        if decision is RoundDecision.WAIT:
            return
        if not evaluating:
            silent = set(state.silent_volunteers) | (awaited - set(state.responded))
            state.silent_volunteers = sorted(silent - set(state.responded))
        if evaluating:
            await self.complete_evaluation(state)
        elif decision is RoundDecision.AGGREGATE:
            await self.close_round(state)
        elif decision is RoundDecision.RETRY:
            state.retries += 1
            ROUND_RETRIES.inc()
            await self.open_round(state, state.round, retry=True)
        else:
            await self.finish(state, TrainingStatus.FAILED,
                              f"round {state.round}: only {accepted} updates after "
                              f"{state.retries + 1} attempts; need {state.min_clients}")

    async def close_round(self, state: TrainingState) -> None:
        """Write the aggregation job naming exactly the accepted updates, in agent order."""
        raw = await self.redis.hgetall(self.keys.round_updates(state.training_id, state.round))
        notices = sorted((UpdateSubmitted.model_validate_json(v) for v in raw.values()),
                         key=lambda n: n.agent_id)
        assert state.current_digest is not None and state.current_version is not None
        params = strategy_params(state)
        bases: dict[int, str] = {}
        for version in {n.received_model_version for n in notices} - {state.current_version}:
            record = await self.rollbacks.index.get(state.training_id, version)
            if record is not None:
                bases[version] = record.model_digest
        # Masked updates cannot be clipped here: the agents clipped them before masking.
        secure = await self.secure.job_spec(state) if state.secure is not None else None
        if state.is_buffered:
            # Updates that arrived while the previous buffer was aggregated join this flush.
            params["buffer_size"] = max(state.buffer_size, len(notices))
        job = AggregationJob(
            training_id=state.training_id, round=state.round, attempt=state.attempt,
            algorithm=state.config.algorithm, algorithm_params=params,
            base_version=state.current_version, base_digest=state.current_digest,
            state_digest=state.state_digest,
            clip_norm=state.clip_norm if state.privacy_level != "none" and state.config.privacy_mode == "central"
            and secure is None else None,
            clip_norm_type=clip_norm_type(state),
            secure=secure,
            carry_integers=state.clip_norm is None and state.secure is None and state.config.local.compression == "none",
            memory_bank=state.config.model if isinstance(state.config.model, MemoryBankModel) else None,
            updates=[UpdateRef(agent_id=n.agent_id, digest=n.update_digest or "", num_examples=n.num_examples,
                               model_version=n.received_model_version,
                               model_digest=bases.get(n.received_model_version), metrics=notice_metrics(n))
                     for n in notices],
        )
        state.phase = RoundPhase.AGGREGATING
        state.deadline_at = time.time() + state.round_deadline_s
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.job_stream, encode(job))
            self.store.stage_save(pipe, state)
            await pipe.execute()
        await self.ctx.emit("round_closed", f"round {state.round}: aggregating {len(notices)} updates",
                            training_id=state.training_id, round=state.round, updates=len(notices),
                            attempt=state.attempt)

    async def aggregation_overdue(self, state: TrainingState) -> None:
        """The pipeline produced no version in time (a failed or lost job): ask again, or give up.

        A secure round starts a new session instead: the usual cause is shares that do not
        remove the masks, and the same job would fail the same way."""
        if state.secure is not None:
            if state.retries + 1 >= state.config.max_round_attempts:
                await self.finish(state, TrainingStatus.FAILED,
                                  f"round {state.round}: no version from {state.retries + 1} secure sessions "
                                  f"(see aggregation_failed events)")
            else:
                await self.secure.restart(state, "no version from the aggregation (see aggregation_failed events)")
            return
        state.aggregation_attempts += 1
        if state.aggregation_attempts >= state.config.max_round_attempts:
            await self.finish(state, TrainingStatus.FAILED,
                              f"round {state.round}: no version after {state.aggregation_attempts} aggregation attempts "
                              f"of {state.round_deadline_s:.0f}s each (see aggregation_failed events)")
            return
        ROUND_RETRIES.inc()
        state.attempt += 1
        await self.close_round(state)

    async def on_version(self, _id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            committed = decode(VersionCommitted, fields)
        except MalformedMessage as exc:
            await self.ctx.reject("versions", "malformed", exc.reason)
            return
        state = await self.store.load(committed.training_id)
        if state is None or state.status.is_final:
            return
        if committed.round == 0 and state.status is TrainingStatus.INITIALIZING:
            self._adopt(state, committed)
            state.status = TrainingStatus.RUNNING
            await self._emit_status(state)
            await self.open_round(state, 1)
        elif committed.round == state.round and state.completed_rounds < committed.round \
                and state.status in (TrainingStatus.RUNNING, TrainingStatus.PAUSED):
            await self.complete_round(state, committed)

    @staticmethod
    def _adopt(state: TrainingState, committed: VersionCommitted) -> None:
        state.current_version = committed.version
        state.current_digest = committed.model_digest
        state.state_digest = committed.state_digest

    async def complete_round(self, state: TrainingState, committed: VersionCommitted) -> None:
        raw = await self.redis.hgetall(self.keys.round_updates(state.training_id, state.round))
        notices = [UpdateSubmitted.model_validate_json(v) for v in raw.values()]
        summary = summarize_notices(notices)
        release_raw = await self.redis.hget(self.keys.release(state.training_id), str(state.round))
        release = ModelReleased.model_validate_json(release_raw) if release_raw else None
        if release is not None:
            state.epsilon_spent = release.privacy.epsilon_spent
        now = time.time()
        server = await self._server_validation(state, committed)
        metrics = RoundMetrics(
            training_id=state.training_id, round=state.round, version=committed.version,
            attempts=state.retries + 1, participants=len(notices), selected=len(state.selected),
            num_examples=int(summary["num_examples"] or 0),
            train_loss=summary["train_loss"], train_accuracy=summary["train_accuracy"],
            eval_loss=summary["eval_loss"], eval_accuracy=summary["eval_accuracy"],
            eval_of_version=state.current_version, round_seconds=now - state.round_started_at,
            upload_bytes=int(summary["upload_bytes"] or 0), dense_bytes=int(summary["dense_bytes"] or 0),
            aggregation_seconds=0.0, epsilon_spent=state.epsilon_spent, completed_at=now,
            server_accuracy=server[0] if server else None, server_loss=server[1] if server else None,
            clip_norm=state.clip_norm,
            update_norm_mean=release.update_norm_mean if release is not None and release.update_norm_mean > 0 else None,
        )
        self._adapt_clip_norm(state, notices, release)
        self._adopt(state, committed)
        state.completed_rounds = state.round
        state.phase = RoundPhase.IDLE
        if metrics.eval_accuracy is not None:
            state.best_accuracy = max(state.best_accuracy or 0.0, metrics.eval_accuracy)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(self.keys.training_metrics(state.training_id), metrics.model_dump_json())
            for agent_id, contribution in (release.contributions if release is not None else {}).items():
                pipe.hincrbyfloat(self.keys.agent_contributions, agent_id, contribution)
            self.store.stage_save(pipe, state)
            await pipe.execute()
        ROUNDS.labels(state.training_id).inc()
        ROUND_SECONDS.observe(metrics.round_seconds)
        await self._discard_committed_uploads(state, notices)
        await self.ctx.emit("round_completed", f"round {state.round} committed as version {committed.version}",
                            training_id=state.training_id, round=state.round,
                            **metrics.model_dump(exclude={"training_id", "round"}))
        if state.pending_rollback is not None:
            target_version, state.pending_rollback = state.pending_rollback, None
            await self.rollbacks.move_to(state, target_version, "rolled back by operator", automatic=False)
        else:
            await self.rollbacks.after_round(state)
        target = state.config.target_accuracy
        reached = target is not None and (metrics.eval_accuracy or 0.0) >= target
        if state.round >= state.config.rounds or reached:
            if state.config.kind == "memory_bank":  # a bank has no accuracy for the agents to evaluate
                await self.complete_evaluation(state)
                return
            state.status = TrainingStatus.EVALUATING
            await self._emit_status(state)
        await self.open_round(state, state.round + 1)

    @staticmethod
    def _adapt_clip_norm(state: TrainingState, notices: list[UpdateSubmitted],
                         release: ModelReleased | None) -> None:
        """Adaptive clipping: move the clip norm by this round's noised count of unclipped updates
        (in a secure round the aggregator unmasked the count; nobody saw an agent's bit)."""
        adaptive = state.config.adaptive_clipping
        if adaptive is None or state.clip_norm is None:
            return
        if state.config.secure_aggregation:
            if release is None or release.unclipped_count is None or not release.contributors:
                return
            unclipped, total = release.unclipped_count, len(release.contributors)
        else:
            bits = [n.unclipped for n in notices if n.kind is TaskKind.TRAIN and n.unclipped is not None]
            if not bits:
                return
            unclipped, total = sum(bits), len(bits)
        clipper = AdaptiveClipper(state.clip_norm, adaptive.target_quantile, adaptive.learning_rate,
                                  adaptive_count_noise_std(state) or 0.0)
        state.clip_norm = clipper.update_from_count(unclipped, total)

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

    async def complete_evaluation(self, state: TrainingState) -> None:
        raw = await self.redis.hgetall(self.keys.round_updates(state.training_id, state.round))
        summary = summarize_notices([UpdateSubmitted.model_validate_json(v) for v in raw.values()])
        if summary["eval_accuracy"] is not None:
            state.final_evaluation = Evaluation(
                loss=float(summary["eval_loss"] or 0.0), accuracy=float(summary["eval_accuracy"]),
                num_examples=int(summary["eval_examples"] or 0))
        state.status = TrainingStatus.SAVING
        state.phase = RoundPhase.IDLE
        await self.store.save(state)
        await self._emit_status(state)
        await self.finish(state, TrainingStatus.COMPLETED, "")

    # -- periodic --------------------------------------------------------------

    async def record_outcome(self, training_id: str, agent_id: str, *, completed: bool) -> None:
        """Append to the agent's recent outcomes in the training (the monitor's failure-rate rule)."""
        key = self.keys.agent_outcomes(training_id)
        previous = await self.redis.hget(key, agent_id)
        history = (text(previous) if previous else "") + ("1" if completed else "0")
        await self.redis.hset(key, agent_id, history[-OUTCOME_HISTORY:])

    async def _report_dropouts(self, state: TrainingState, alive: set[str]) -> None:
        gone = [a for a in state.selected if a not in alive and a not in state.responded
                and a not in state.dropped]
        if not gone:
            return
        state.dropped.extend(gone)
        await self.store.save(state)
        for agent_id in gone:
            await self.record_outcome(state.training_id, agent_id, completed=False)
            await self.ctx.emit("agent_dropped", f"agent stopped heartbeating during round {state.round}",
                                severity=Severity.WARNING, training_id=state.training_id,
                                round=state.round, agent_id=agent_id)
