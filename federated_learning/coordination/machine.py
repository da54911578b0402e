"""The synchronous round protocol as a pure state machine: ``step(state, input, now)``.

Every decision the coordinator takes about a training's rounds lives here: opening a
round with over-selection, taking or refusing an update notice, deciding to wait,
aggregate, retry or give up, building the aggregation job, completing a round when its
version is committed, the final evaluation round, and finishing. Nothing here reads or
writes Redis: what the shell must read is asked for by a follow-up effect, and comes
back as another input. Buffered (FedBuff) trainings and the secure exchange are policies of
the same machine (``buffered.py``, ``secure_exchange.py``); every training takes updates
through one path (``CheckUpdate`` then ``AcceptUpdate``).

``step`` works on a copy: the caller's state is never changed.
"""

from __future__ import annotations

from federated_learning.coordination import buffered, initial, rollbacks, secure_exchange
from federated_learning.coordination.checks import notice_metrics, strategy_params
from federated_learning.coordination.effects import (
    AcceptUpdate,
    AppendMetrics,
    CheckUpdate,
    CloseRound,
    CountLate,
    DiscardUploads,
    Effect,
    Emit,
    GatherEvaluation,
    GatherResults,
    JudgeRollbacks,
    OpenRound,
    ReadVersion,
    RecordOutcome,
    Reject,
    RevokeUpdate,
    Save,
    SendTasks,
    TallyRound,
    TallySecure,
    WriteJob,
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
from federated_learning.coordination.lifecycle import (
    complete_evaluation,
    finish,
    status_changed,
)
from federated_learning.coordination.rounds import RoundDecision, decide_round, summarize_notices
from federated_learning.coordination.secure import SecureRoundState
from federated_learning.coordination.selection import round_rng, select_agents
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.coordination.tasks import build_tasks
from federated_learning.privacy.mechanisms import AdaptiveClipper
from federated_learning.privacy.release import adaptive_count_noise_std, clip_norm_type
from federated_learning.protocol.messages import (
    AggregationJob,
    MemoryBankModel,
    ModelReleased,
    RoundMetrics,
    Severity,
    TaskKind,
    TrainingStatus,
    UpdateRef,
    UpdateSubmitted,
    VersionCommitted,
)

Transition = tuple[TrainingState, list[Effect]]

RUNNING_STATES = (TrainingStatus.RUNNING, TrainingStatus.EVALUATING, TrainingStatus.SAVING)


def step(state: TrainingState, event: Input, now: float) -> Transition:
    """The training's next state and the effects that carry it out."""
    state = state.copy_for_update()
    match event:
        case RoundCandidates():
            return open_round(state, event, now)
        case NoticeArrived():
            if buffered.takes_notice(state, event.notice.kind):
                return buffered.screen_notice(state, event, now)
            return screen_notice(state, event)
        case NoticeChecked():
            if buffered.takes_notice(state, event.notice.kind):
                return buffered.take_notice(state, event)
            return take_notice(state, event)
        case UpdateRefusedBy():
            return revoke_update(state, event)
        case BufferCandidates():
            return buffered.refill(state, event, now)
        case BufferTallied():
            return buffered.flush_if_full(state, event)
        case SecureMessageArrived():
            return secure_exchange.screen_message(state, event)
        case SecureTallied():
            return secure_exchange.tally(state, event, now)
        case KeysCollected():
            return secure_exchange.publish_roster(state, event, now)
        case SharesCollected():
            return secure_exchange.deliver_shares(state, event, now)
        case UploadersCollected():
            return secure_exchange.request_unmasking(state, event, now)
        case RoundTallied():
            return advance(state, event, now)
        case RoundUpdates():
            return close_round(state, event, now)
        case AggregationOverdue():
            return aggregation_overdue(state)
        case VersionArrived():
            return version_arrived(state, event.committed)
        case RoundResults():
            return complete_round(state, event, now)
        case VersionsScored():
            return rollbacks.judge_versions(state, event)
        case RollbackTarget():
            return rollbacks.roll_back_after_round(state, event)
        case RollbackRequested():
            return rollbacks.request(state, event)
        case EvaluationReported():
            return complete_evaluation(state, event.notices)
        case ParameterCandidates():
            return initial.ask_for_parameters(state, event, now)
        case ParametersArrived():
            return initial.screen_parameters(state, event)
        case ParametersUnusable():
            return initial.parameters_unusable(state, event)
        case InitialModelStored():
            return initial.adopt_initial_model(state, event)
        case ModelRefusedBy():
            return initial.model_refused(state, event)
        case FinishRequested():
            return finish(state, event.status, event.reason)
        case AgentsAlive():
            return report_dropouts(state, event.alive)


# -- opening a round ---------------------------------------------------------------


def open_round(state: TrainingState, given: RoundCandidates, now: float) -> Transition:
    """Select agents and send them their tasks; pause when too few are alive."""
    evaluating = state.status is TrainingStatus.EVALUATING
    if given.round != state.round:
        state.selected, state.responded, state.dropped, state.retries = [], [], [], 0
        state.attempt, state.aggregation_attempts = 0, 0
    state.round = given.round
    available = list(given.candidates if evaluating else given.available)
    volunteers = [] if evaluating or state.config.secure_aggregation else list(given.volunteers)
    effects: list[Effect] = []
    if not evaluating and len(available) + len(volunteers) < state.min_clients:
        if state.status is not TrainingStatus.PAUSED:
            capped = len(available) < len(given.candidates)
            state.status = TrainingStatus.PAUSED
            state.reason = (f"only {len(available) + len(volunteers)} agents alive with dataset "
                            f"'{state.config.dataset}'" + (
                                f" and under the hourly cap of {state.config.max_tasks_per_agent_per_hour} tasks"
                                if capped else "") + f"; need {state.min_clients}")
            state.phase = RoundPhase.IDLE
            effects += [Save(), status_changed(state, Severity.WARNING)]
        return state, effects
    if state.status is TrainingStatus.PAUSED:
        state.status, state.reason = TrainingStatus.RUNNING, ""
        effects.append(status_changed(state))
    state.attempt += 1
    state.secure = SecureRoundState(attempt=state.attempt) \
        if state.config.secure_aggregation and not evaluating else None
    rng = round_rng(state.training_id, given.round, state.attempt)
    if evaluating:
        chosen = [agent for agent in given.candidates if agent not in state.selected]
    else:
        # A retry asks agents not asked before; when too few are left (after an outage longer
        # than the deadline, say) it asks again the live agents whose update is still missing.
        wanted = state.clients_per_round - len(given.accepted)
        fresh = [agent for agent in available if agent not in state.selected]
        exclude = state.selected if len(fresh) >= wanted else sorted(given.accepted)
        chosen = select_agents(available, wanted, state.config.over_selection, rng, exclude=exclude,
                               weights=dict(given.weights) if given.weights is not None else None)
    state.selected = sorted(set(state.selected) | set(chosen))
    state.phase = RoundPhase.COLLECTING
    state.deadline_at = now + state.round_deadline_s
    if not given.retry:
        state.round_started_at = now
    kind = TaskKind.EVALUATE if evaluating else TaskKind.TRAIN
    effects += [
        SendTasks(build_tasks(state, chosen, kind, state.deadline_at)), Save(),
        Emit("round_started" if not given.retry else "round_retried",
             f"{kind.value} round {given.round} attempt {state.attempt}: "
             f"asked {len(chosen)} of {len(given.candidates)} eligible agents",
             data={"attempt": state.attempt, "selected": len(chosen), "eligible": len(given.candidates)}),
    ]
    return state, effects


# -- update notices ----------------------------------------------------------------


def _refuse(notice: UpdateSubmitted, reason: str, detail: str, severity: Severity = Severity.WARNING) -> Reject:
    return Reject("updates", reason, detail, notice.training_id, notice.round, notice.agent_id, severity)


def screen_notice(state: TrainingState, given: NoticeArrived) -> Transition:
    """Refuse a notice the round cannot take (another round or kind, an agent not asked),
    count one that came just late, or ask the shell to check the rest (``CheckUpdate``)."""
    notice = given.notice
    expected_kind = TaskKind.EVALUATE if state.status is TrainingStatus.EVALUATING else TaskKind.TRAIN
    # A volunteer that syncs while the training waits for agents (PAUSED) has sent an update of
    # the round that opens next: it is kept for that round, not refused as late.
    waiting_round = given.volunteer and state.status is TrainingStatus.PAUSED and state.secure is None
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
            return state, [CountLate(notice, where)]
        return state, [_refuse(notice, "stale_round", where)]
    if notice.agent_id not in state.selected:
        # Volunteers (plain-HTTP clients) send unasked; an update trained on a recent
        # version is re-based onto the current one by the aggregator (close_round names its base).
        current = state.current_version or 0
        recent = current - state.config.max_staleness <= notice.received_model_version <= current
        if not (given.volunteer and recent and state.secure is None):
            return state, [_refuse(notice, "not_selected", f"agent was not asked in round {notice.round}")]
        state.selected = sorted({*state.selected, notice.agent_id})
    return state, [CheckUpdate(notice, given.entry_id, state.round)]


def take_notice(state: TrainingState, given: NoticeChecked) -> Transition:
    """The agent has answered: record its update (or the reason it is refused), then see
    whether the round can move on."""
    notice = given.notice
    if notice.agent_id not in state.responded:
        state.responded.append(notice.agent_id)
    if given.problem is not None:
        return state, [Save(), _refuse(notice, *given.problem), TallyRound()]
    # No Save: an accepted agent's place in ``responded`` (and a volunteer's in ``selected``) is
    # known from the round's accepted updates, which the shell restores when it loads a state;
    # the state is written once per round step, not once per update.
    effects: list[Effect] = [AcceptUpdate(notice, given.entry_id, notice.round)]
    if notice.kind is TaskKind.TRAIN:
        effects.append(RecordOutcome(notice.agent_id, completed=True))
    return state, [*effects, TallyRound()]


def revoke_update(state: TrainingState, given: UpdateRefusedBy) -> Transition:
    """The aggregator read an accepted update whole and found it invalid: count the refusal; while
    the update's round still collects, withdraw it (the agent may send another, and the round waits
    as it would for any missing update). After that the job leaves it out."""
    refusal, accepted = given.refusal, given.accepted
    reject = Reject("updates", refusal.reason, refusal.detail, refusal.training_id, refusal.round, refusal.agent_id)
    if accepted is None or accepted.update_digest != refusal.update_digest:
        return state, [reject]  # withdrawn already (a redelivery), or since replaced by another upload
    collecting: int | None
    if buffered.takes_notice(state, TaskKind.TRAIN):
        collecting = buffered.open_buffer_number(state)
    else:
        collecting = state.round if state.phase is RoundPhase.COLLECTING else None
    withdraw = refusal.round == collecting
    effects: list[Effect] = [RevokeUpdate(accepted, refusal.round, withdraw),
                             RecordOutcome(refusal.agent_id, completed=False), reject]
    if withdraw and not state.is_buffered:
        effects.append(TallyRound())
    return state, effects


# -- deciding ----------------------------------------------------------------------


def advance(state: TrainingState, tally: RoundTallied, now: float) -> Transition:
    """Wait, aggregate, retry with a new selection, or give up."""
    if state.phase is not RoundPhase.COLLECTING:
        return state, []
    evaluating = state.status is TrainingStatus.EVALUATING
    if state.secure is not None and not evaluating:
        return state, [TallySecure()]
    # Live volunteers (plain-HTTP clients) may still send an update for this round; one that
    # let the last round it was waited for close without its update is not waited for again.
    expected = set(state.selected)
    awaited: set[str] = set()
    if not evaluating:
        awaited = set(tally.volunteers) - expected
        awaited -= set(state.silent_volunteers) - set(state.responded)
        expected |= awaited
    decision = decide_round(
        accepted=tally.accepted, responded=len(state.responded), selected=len(expected),
        target=len(state.selected) if evaluating else state.clients_per_round,
        min_clients=0 if evaluating else state.min_clients,
        now=now, deadline_at=state.deadline_at,
        attempt=state.retries + 1, max_attempts=state.config.max_round_attempts,
    )
    if decision is RoundDecision.WAIT:
        return state, []
    if evaluating:
        return state, [GatherEvaluation()]
    silent = set(state.silent_volunteers) | (awaited - set(state.responded))
    state.silent_volunteers = sorted(silent - set(state.responded))
    if decision is RoundDecision.AGGREGATE:
        return state, [CloseRound()]
    if decision is RoundDecision.RETRY:
        state.retries += 1
        return state, [OpenRound(state.round, retry=True)]
    return finish(state, TrainingStatus.FAILED, f"round {state.round}: only {tally.accepted} updates after "
                                                f"{state.retries + 1} attempts; need {state.min_clients}")


def close_round(state: TrainingState, given: RoundUpdates, now: float) -> Transition:
    """Write the aggregation job naming exactly the accepted updates, in agent order."""
    assert state.current_digest is not None and state.current_version is not None
    notices = sorted(given.notices, key=lambda n: n.agent_id)
    params = strategy_params(state)
    if state.is_buffered:
        # Updates that arrived while the previous buffer was aggregated join this flush.
        params["buffer_size"] = max(state.buffer_size, len(notices))
    job = AggregationJob(
        training_id=state.training_id, round=state.round, attempt=state.attempt,
        algorithm=state.config.algorithm, algorithm_params=params,
        base_version=state.current_version, base_digest=state.current_digest,
        state_digest=state.state_digest,
        # Masked updates cannot be clipped here: the agents clipped them before masking.
        clip_norm=state.clip_norm if state.privacy_level != "none" and state.config.privacy_mode == "central"
        and given.secure is None else None,
        clip_norm_type=clip_norm_type(state),
        secure=given.secure,
        carry_integers=state.clip_norm is None and state.secure is None and state.config.local.compression == "none",
        # The aggregator refuses an update that fails its own checks (a blob replaced after it was
        # accepted, say) and aggregates the rest, down to what the round needs.
        min_updates=1 if state.is_buffered else max(1, min(state.min_clients, len(notices))),
        memory_bank=state.config.model if isinstance(state.config.model, MemoryBankModel) else None,
        updates=[UpdateRef(agent_id=n.agent_id, digest=n.update_digest or "", num_examples=n.num_examples,
                           model_version=n.received_model_version,
                           model_digest=given.bases.get(n.received_model_version), metrics=notice_metrics(n))
                 for n in notices],
    )
    state.phase = RoundPhase.AGGREGATING
    state.deadline_at = now + state.round_deadline_s
    return state, [WriteJob(job), Save(),
                   Emit("round_closed", f"round {state.round}: aggregating {len(notices)} updates",
                        data={"updates": len(notices), "attempt": state.attempt})]


def aggregation_overdue(state: TrainingState) -> Transition:
    """The pipeline produced no version in time (a failed or lost job): ask again, or give up.

    A secure round starts a new session instead: the usual cause is shares that do not
    remove the masks, and the same job would fail the same way."""
    if state.secure is not None:
        if state.retries + 1 >= state.config.max_round_attempts:
            return finish(state, TrainingStatus.FAILED, f"round {state.round}: no version from "
                                                        f"{state.retries + 1} secure sessions (see aggregation_failed events)")
        return secure_exchange.restart(state, "no version from the aggregation (see aggregation_failed events)")
    state.aggregation_attempts += 1
    if state.aggregation_attempts >= state.config.max_round_attempts:
        return finish(state, TrainingStatus.FAILED,
                      f"round {state.round}: no version after {state.aggregation_attempts} aggregation attempts "
                      f"of {state.round_deadline_s:.0f}s each (see aggregation_failed events)")
    state.attempt += 1
    return state, [CloseRound()]


# -- committed versions --------------------------------------------------------------


def adopt(state: TrainingState, committed: VersionCommitted) -> None:
    state.current_version = committed.version
    state.current_digest = committed.model_digest
    state.state_digest = committed.state_digest


def version_arrived(state: TrainingState, committed: VersionCommitted) -> Transition:
    """Version 0 starts the first round; the current round's version completes it."""
    if state.status.is_final:
        return state, []
    if committed.round == 0 and state.status is TrainingStatus.INITIALIZING:
        adopt(state, committed)
        state.status = TrainingStatus.RUNNING
        return state, [status_changed(state), OpenRound(1)]
    if committed.round == state.round and state.completed_rounds < committed.round \
            and state.status in (TrainingStatus.RUNNING, TrainingStatus.PAUSED):
        return state, [GatherResults(committed)]
    return state, []


def round_metrics(state: TrainingState, results: RoundResults, now: float) -> RoundMetrics:
    summary = summarize_notices(list(results.notices))
    release, server = results.release, results.server
    return RoundMetrics(
        training_id=state.training_id, round=state.round, version=results.committed.version,
        attempts=state.retries + 1, participants=len(results.notices), selected=len(state.selected),
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


def complete_round(state: TrainingState, results: RoundResults, now: float) -> Transition:
    """Record the round's figures, adopt its version, then let the rollback policy judge."""
    if results.release is not None:
        state.epsilon_spent = results.release.privacy.epsilon_spent
    metrics = round_metrics(state, results, now)
    adapt_clip_norm(state, results.notices, results.release)
    adopt(state, results.committed)
    state.completed_rounds = state.round
    state.phase = RoundPhase.IDLE
    if metrics.eval_accuracy is not None:
        state.best_accuracy = max(state.best_accuracy or 0.0, metrics.eval_accuracy)
    contributions = results.release.contributions if results.release is not None else {}
    return state, [
        AppendMetrics(metrics, contributions), Save(), DiscardUploads(results.notices),
        Emit("round_completed", f"round {state.round} committed as version {results.committed.version}",
             data=metrics.model_dump(exclude={"training_id", "round"})),
        next_after(state, metrics.eval_accuracy),
    ]


def next_after(state: TrainingState, eval_accuracy: float | None) -> ReadVersion | JudgeRollbacks:
    """An operator's rollback deferred while the round aggregated goes first; else the policy judges."""
    if state.pending_rollback is not None:
        return ReadVersion(state.pending_rollback, "rolled back by operator", automatic=False,
                           eval_accuracy=eval_accuracy)
    return JudgeRollbacks(eval_accuracy)


def adapt_clip_norm(state: TrainingState, notices: tuple[UpdateSubmitted, ...] | list[UpdateSubmitted],
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


# -- the clock -----------------------------------------------------------------------


def report_dropouts(state: TrainingState, alive: frozenset[str]) -> Transition:
    """Selected agents that stopped heartbeating before answering count as dropped."""
    if state.phase is not RoundPhase.COLLECTING:
        return state, []
    gone = [a for a in state.selected if a not in alive and a not in state.responded and a not in state.dropped]
    if not gone:
        return state, []
    state.dropped.extend(gone)
    effects: list[Effect] = [Save()]
    for agent_id in gone:
        effects += [RecordOutcome(agent_id, completed=False),
                    Emit("agent_dropped", f"agent stopped heartbeating during round {state.round}",
                         Severity.WARNING, agent_id=agent_id)]
    return state, effects
