"""Every transition of the coordinator's state machine, from hand-built states (no Redis)."""

from __future__ import annotations

from typing import Any

import pytest

from federated_learning.coordination import effects as fx
from federated_learning.coordination.inputs import (
    AgentsAlive,
    AggregationOverdue,
    BufferCandidates,
    BufferTallied,
    EvaluationReported,
    FinishRequested,
    InitialModelStored,
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
    UpdateRefusedBy,
    VersionArrived,
    VersionsScored,
)
from federated_learning.coordination.machine import step
from federated_learning.coordination.secure import SecureRoundState
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.protocol.messages import (
    Evaluation,
    ModelRefused,
    ModelReleased,
    PresetModel,
    PrivacyReport,
    RollbackTraining,
    TaskKind,
    TrainingConfig,
    TrainingStatus,
    UpdateRefused,
    UpdateSubmitted,
    VersionCommitted,
    VersionRecord,
)
from federated_learning.versioning.rollback import VersionScore

DIGEST = "a" * 64
NOW = 1_000.0
AGENTS = tuple(f"agent-{i:02d}" for i in range(10))


def training(**overrides: Any) -> TrainingState:
    config = {"dataset": "digits", "model": PresetModel(num_features=4, num_classes=2),
              "rounds": 3, **overrides.pop("config", {})}
    fields: dict[str, Any] = {
        "training_id": "t1", "config": TrainingConfig(**config), "min_clients": 2, "clients_per_round": 4,
        "round_deadline_s": 30.0, "privacy_level": "none", "status": TrainingStatus.RUNNING,
        "current_version": 0, "current_digest": DIGEST, **overrides}
    return TrainingState(**fields)


def collecting(**overrides: Any) -> TrainingState:
    fields: dict[str, Any] = {"round": 1, "attempt": 1, "phase": RoundPhase.COLLECTING,
                              "selected": list(AGENTS[:5]), "deadline_at": NOW + 30, "round_started_at": NOW,
                              **overrides}
    return training(**fields)


def notice(agent: str = "agent-00", round: int = 1, kind: TaskKind = TaskKind.TRAIN, **extra: Any) -> UpdateSubmitted:
    fields: dict[str, Any] = {"training_id": "t1", "round": round, "attempt": 1, "agent_id": agent,
                              "kind": kind, "received_model_version": 0, "num_examples": 10, **extra}
    if kind is TaskKind.TRAIN:
        fields.setdefault("update_digest", "b" * 64)
    if kind is TaskKind.EVALUATE:
        fields.setdefault("evaluation", Evaluation(loss=0.5, accuracy=0.8, num_examples=10))
    return UpdateSubmitted(**fields)


def candidates(round: int = 1, *, agents: tuple[str, ...] = AGENTS, retry: bool = False,
               accepted: frozenset[str] = frozenset(), **extra: Any) -> RoundCandidates:
    return RoundCandidates(round=round, retry=retry, candidates=agents, available=extra.pop("available", agents),
                           volunteers=extra.pop("volunteers", ()), accepted=accepted, **extra)


def of(effects: list[fx.Effect], kind: type) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


# -- step itself -------------------------------------------------------------------------


def test_step_never_changes_the_state_it_is_given() -> None:
    state = training()
    before = state.model_dump()
    new, _ = step(state, candidates(), NOW)
    assert state.model_dump() == before
    assert new.phase is RoundPhase.COLLECTING


# -- opening rounds ----------------------------------------------------------------------


def test_a_round_over_selects_sends_tasks_and_saves_in_one_step() -> None:
    state, effects = step(training(), candidates(), NOW)
    (send,) = of(effects, fx.SendTasks)
    assert len(send.tasks) == 5  # ceil(4 * 1.2)
    assert state.selected == sorted(agent for agent, _ in send.tasks)
    assert all(task.kind is TaskKind.TRAIN and task.round == 1 and task.attempt == 1
               and task.deadline_at == NOW + 30 for _, task in send.tasks)
    assert of(effects, fx.Save) and of(effects, fx.Emit)[0].kind == "round_started"
    assert (state.phase, state.round_started_at, state.deadline_at) == (RoundPhase.COLLECTING, NOW, NOW + 30)


def test_the_same_round_selects_the_same_agents_after_a_restart() -> None:
    first = step(training(), candidates(), NOW)[0].selected
    assert step(training(), candidates(), NOW + 5)[0].selected == first


def test_too_few_live_agents_pause_the_training_once() -> None:
    state, effects = step(training(), candidates(agents=("agent-00",)), NOW)
    assert state.status is TrainingStatus.PAUSED and "only 1 agents alive" in state.reason
    assert not of(effects, fx.SendTasks)
    assert of(effects, fx.StatusChanged)[0].status is TrainingStatus.PAUSED
    again, effects = step(state, candidates(agents=("agent-00",)), NOW + 1)
    assert again.status is TrainingStatus.PAUSED and effects == []


def test_the_hourly_cap_is_named_when_it_is_why_the_training_pauses() -> None:
    state, _ = step(training(config={"max_tasks_per_agent_per_hour": 2}),
                    candidates(available=("agent-00",)), NOW)
    assert "hourly cap of 2 tasks" in state.reason


def test_live_volunteers_count_towards_the_minimum() -> None:
    state, effects = step(training(), candidates(agents=("agent-00",), volunteers=("http-1",)), NOW)
    assert state.status is TrainingStatus.RUNNING
    assert [agent for agent, _ in of(effects, fx.SendTasks)[0].tasks] == ["agent-00"]


def test_a_paused_training_resumes_when_agents_come_back() -> None:
    state, effects = step(training(status=TrainingStatus.PAUSED, reason="few"), candidates(), NOW)
    assert state.status is TrainingStatus.RUNNING and state.reason == ""
    assert of(effects, fx.StatusChanged)[0].status is TrainingStatus.RUNNING


def test_a_retry_asks_agents_not_asked_before_and_keeps_the_start_time() -> None:
    state = collecting(retries=1, round_started_at=NOW - 100)
    new, effects = step(state, candidates(retry=True, accepted=frozenset({"agent-00"})), NOW)
    asked = {agent for agent, _ in of(effects, fx.SendTasks)[0].tasks}
    assert not asked & set(AGENTS[:5])
    assert new.attempt == 2 and new.round_started_at == NOW - 100
    assert of(effects, fx.Emit)[0].kind == "round_retried"


def test_a_retry_with_nobody_new_asks_the_live_agents_still_missing() -> None:
    state = collecting(selected=list(AGENTS), retries=1)
    _, effects = step(state, candidates(retry=True, accepted=frozenset({"agent-00", "agent-01"})), NOW)
    asked = {agent for agent, _ in of(effects, fx.SendTasks)[0].tasks}
    assert asked and not asked & {"agent-00", "agent-01"}


def test_a_new_round_forgets_the_last_rounds_selection() -> None:
    state = collecting(responded=["agent-00"], dropped=["agent-01"], retries=2, aggregation_attempts=1)
    new, _ = step(state.model_copy(update={"phase": RoundPhase.IDLE}), candidates(round=2), NOW)
    assert (new.round, new.attempt, new.retries, new.responded, new.dropped) == (2, 1, 0, [], [])


def test_the_evaluation_round_asks_every_eligible_agent() -> None:
    state = training(status=TrainingStatus.EVALUATING, round=3)
    _, effects = step(state, candidates(round=4), NOW)
    tasks = of(effects, fx.SendTasks)[0].tasks
    assert len(tasks) == len(AGENTS) and all(task.kind is TaskKind.EVALUATE for _, task in tasks)


def test_a_secure_round_starts_a_session_and_marks_its_tasks() -> None:
    state, effects = step(training(config={"secure_aggregation": True, "local": {"clip_norm": 1.0}},
                                   clip_norm=1.0, min_clients=3), candidates(), NOW)
    assert state.secure == SecureRoundState(attempt=1)
    assert all(task.secure for _, task in of(effects, fx.SendTasks)[0].tasks)


# -- update notices ----------------------------------------------------------------------


def test_a_notice_of_a_selected_agent_is_checked() -> None:
    _, effects = step(collecting(), NoticeArrived(notice(), "1-0", volunteer=False), NOW)
    assert effects == [fx.CheckUpdate(notice(), "1-0", 1)]


def test_a_notice_from_an_agent_not_asked_is_refused() -> None:
    _, effects = step(collecting(), NoticeArrived(notice("agent-09"), "1-0", volunteer=False), NOW)
    (reject,) = of(effects, fx.Reject)
    assert reject.reason == "not_selected" and reject.agent_id == "agent-09"


def test_a_volunteers_recent_update_joins_the_round() -> None:
    state, effects = step(collecting(), NoticeArrived(notice("http-1"), "1-0", volunteer=True), NOW)
    assert "http-1" in state.selected and of(effects, fx.CheckUpdate)


def test_a_volunteers_update_on_a_too_old_version_is_refused() -> None:
    state = collecting(current_version=20)
    _, effects = step(state, NoticeArrived(notice("http-1", received_model_version=5), "1-0", volunteer=True), NOW)
    assert of(effects, fx.Reject)[0].reason == "not_selected"


def test_an_update_just_after_its_round_closed_is_late_not_rejected() -> None:
    state = collecting(phase=RoundPhase.AGGREGATING)
    _, effects = step(state, NoticeArrived(notice(), "1-0", volunteer=False), NOW)
    assert len(of(effects, fx.CountLate)) == 1 and not of(effects, fx.Reject)


def test_an_update_for_an_old_round_is_stale() -> None:
    state = collecting(round=5)
    _, effects = step(state, NoticeArrived(notice(round=2), "1-0", volunteer=False), NOW)
    assert of(effects, fx.Reject)[0].reason == "stale_round"


def test_an_update_for_a_future_round_is_stale() -> None:
    _, effects = step(collecting(), NoticeArrived(notice(round=2), "1-0", volunteer=False), NOW)
    assert of(effects, fx.Reject)[0].reason == "stale_round"


def test_a_train_notice_during_the_evaluation_round_is_stale() -> None:
    state = collecting(status=TrainingStatus.EVALUATING)
    _, effects = step(state, NoticeArrived(notice(), "1-0", volunteer=False), NOW)
    assert of(effects, fx.Reject)[0].reason == "stale_round"


def test_a_volunteer_syncing_while_paused_is_kept_for_the_next_round() -> None:
    state = collecting(status=TrainingStatus.PAUSED, phase=RoundPhase.IDLE)
    _, effects = step(state, NoticeArrived(notice("http-1"), "1-0", volunteer=True), NOW)
    assert of(effects, fx.CheckUpdate)


def test_a_checked_update_is_accepted_with_its_marker_and_outcome_then_tallied() -> None:
    state, effects = step(collecting(), NoticeChecked(notice(), "1-0", None), NOW)
    assert state.responded == ["agent-00"]
    assert effects == [fx.AcceptUpdate(notice(), "1-0", 1), fx.RecordOutcome("agent-00", completed=True),
                       fx.TallyRound()]  # no Save: the accepted update itself says the agent answered


def test_a_stored_state_gets_its_accepted_agents_back_as_answered() -> None:
    stored = collecting(responded=["agent-01"])  # as written before agent-00's and a volunteer's updates
    stored.restore_accepted(["agent-00", "agent-01", "http-1"])
    assert stored.responded == ["agent-01", "agent-00", "http-1"]
    assert stored.selected == sorted([*AGENTS[:5], "http-1"])


def test_an_update_with_a_bad_blob_counts_as_an_answer_but_is_refused() -> None:
    state, effects = step(collecting(), NoticeChecked(notice(), "1-0", ("non_finite", "NaN in w")), NOW)
    assert state.responded == ["agent-00"]
    assert not of(effects, fx.AcceptUpdate)
    assert of(effects, fx.Reject)[0].reason == "non_finite"


def refused(agent: str = "agent-00", round: int = 1, digest: str = "b" * 64) -> UpdateRefused:
    return UpdateRefused(training_id="t1", round=round, agent_id=agent, update_digest=digest,
                         reason="not_finite", detail="layer 'w' contains NaN or Inf")


def test_an_update_the_aggregator_refuses_while_the_round_collects_is_withdrawn_and_counted() -> None:
    state, effects = step(collecting(responded=["agent-00"]), UpdateRefusedBy(refused(), notice()), NOW)
    assert effects == [fx.RevokeUpdate(notice(), 1, withdraw=True), fx.RecordOutcome("agent-00", completed=False),
                       fx.Reject("updates", "not_finite", "layer 'w' contains NaN or Inf", "t1", 1, "agent-00"),
                       fx.TallyRound()]
    assert state.responded == ["agent-00"], "it answered: the round does not wait for it again"


def test_an_update_refused_after_its_round_closed_is_counted_and_left_to_the_job() -> None:
    _, effects = step(collecting(phase=RoundPhase.AGGREGATING), UpdateRefusedBy(refused(), notice()), NOW)
    assert effects[0] == fx.RevokeUpdate(notice(), 1, withdraw=False)
    assert of(effects, fx.Reject) and not of(effects, fx.TallyRound)


def test_a_refusal_of_an_update_since_withdrawn_or_replaced_is_only_counted() -> None:
    for accepted in (None, notice(update_digest="c" * 64)):
        _, effects = step(collecting(), UpdateRefusedBy(refused(), accepted), NOW)
        assert [type(e) for e in effects] == [fx.Reject]


def test_a_buffered_update_refused_while_its_buffer_fills_is_withdrawn() -> None:
    _, effects = step(buffered(), UpdateRefusedBy(refused(), notice()), NOW)
    assert effects[0] == fx.RevokeUpdate(notice(), 1, withdraw=True) and not of(effects, fx.TallyRound)
    _, effects = step(buffered(phase=RoundPhase.AGGREGATING), UpdateRefusedBy(refused(), notice()), NOW)
    assert effects[0] == fx.RevokeUpdate(notice(), 1, withdraw=False)


# -- deciding ------------------------------------------------------------------------------


def test_the_round_waits_while_updates_are_missing() -> None:
    state = collecting(responded=["agent-00"])
    assert step(state, RoundTallied(1, ()), NOW)[1] == []


def test_the_round_closes_at_its_target() -> None:
    _, effects = step(collecting(responded=list(AGENTS[:4])), RoundTallied(4, ()), NOW)
    assert effects == [fx.CloseRound()]


def test_a_round_short_of_updates_at_the_deadline_retries() -> None:
    state, effects = step(collecting(responded=["agent-00"]), RoundTallied(1, ()), NOW + 31)
    assert state.retries == 1 and effects == [fx.OpenRound(1, retry=True)]


def test_a_round_short_of_updates_after_every_attempt_fails_the_training() -> None:
    state, effects = step(collecting(retries=2), RoundTallied(1, ()), NOW + 31)
    assert state.status is TrainingStatus.FAILED and "only 1 updates after 3 attempts" in state.reason
    assert fx.Save(active=False) in effects and of(effects, fx.ActivateQueued)


def test_a_live_volunteer_is_awaited_once_then_not_again() -> None:
    everyone = list(AGENTS[:5])
    state, effects = step(collecting(responded=everyone), RoundTallied(3, ("http-1",)), NOW)
    assert effects == []  # waits for the volunteer until the deadline
    state, effects = step(state, RoundTallied(3, ("http-1",)), NOW + 31)
    assert effects == [fx.CloseRound()] and state.silent_volunteers == ["http-1"]
    next_round = state.model_copy(update={"round": 2, "deadline_at": NOW + 100})
    _, effects = step(next_round, RoundTallied(3, ("http-1",)), NOW + 40)
    assert effects == [fx.CloseRound()]  # not waited for again


def test_a_secure_round_hands_the_decision_to_its_exchange() -> None:
    state = collecting(secure=SecureRoundState(attempt=1))
    assert step(state, RoundTallied(0, ()), NOW)[1] == [fx.TallySecure()]


def test_the_evaluation_round_completes_when_everyone_asked_answered() -> None:
    state = collecting(status=TrainingStatus.EVALUATING, responded=list(AGENTS[:5]))
    assert step(state, RoundTallied(5, ()), NOW)[1] == [fx.GatherEvaluation()]


def test_a_round_that_is_not_collecting_ignores_a_tally() -> None:
    assert step(collecting(phase=RoundPhase.AGGREGATING), RoundTallied(9, ()), NOW)[1] == []


# -- closing and committing -------------------------------------------------------------------


def test_closing_writes_a_job_naming_exactly_the_accepted_updates_in_agent_order() -> None:
    notices = (notice("agent-03"), notice("agent-01", received_model_version=0))
    state, effects = step(collecting(), RoundUpdates(notices), NOW)
    (write,) = of(effects, fx.WriteJob)
    assert [u.agent_id for u in write.job.updates] == ["agent-01", "agent-03"]
    assert write.job.base_digest == DIGEST and write.job.clip_norm is None and write.job.carry_integers
    assert write.job.min_updates == 2  # the training's min_clients
    assert state.phase is RoundPhase.AGGREGATING and state.deadline_at == NOW + 30


def test_closing_names_the_base_of_an_update_trained_on_an_older_version() -> None:
    older = "c" * 64
    state = collecting(current_version=3)
    _, effects = step(state, RoundUpdates((notice(received_model_version=2),), {2: older}), NOW)
    assert of(effects, fx.WriteJob)[0].job.updates[0].model_digest == older


def test_central_dp_asks_the_aggregator_to_clip() -> None:
    state = collecting(privacy_level="high", clip_norm=1.5)
    _, effects = step(state, RoundUpdates((notice(),)), NOW)
    assert of(effects, fx.WriteJob)[0].job.clip_norm == 1.5


def test_an_overdue_aggregation_is_asked_again_then_gives_up() -> None:
    state = collecting(phase=RoundPhase.AGGREGATING)
    state, effects = step(state, AggregationOverdue(), NOW)
    assert (state.attempt, state.aggregation_attempts, effects) == (2, 1, [fx.CloseRound()])
    state, _ = step(state, AggregationOverdue(), NOW)
    state, _ = step(state, AggregationOverdue(), NOW)
    assert state.status is TrainingStatus.FAILED and "3 aggregation attempts" in state.reason


def test_an_overdue_secure_aggregation_restarts_the_session() -> None:
    state = collecting(phase=RoundPhase.AGGREGATING, secure=SecureRoundState(attempt=1))
    state, effects = step(state, AggregationOverdue(), NOW)
    assert state.secure is None and state.selected == [] and state.retries == 1
    assert fx.ClearRoundUpdates(1) in effects and effects[-1] == fx.OpenRound(1, retry=True)


def committed(version: int = 1, round: int = 1) -> VersionCommitted:
    return VersionCommitted(training_id="t1", version=version, round=round, model_digest="d" * 64)


def test_version_zero_starts_the_first_round() -> None:
    state = training(status=TrainingStatus.INITIALIZING, current_version=None, current_digest=None)
    state, effects = step(state, VersionArrived(committed(0, 0)), NOW)
    assert state.status is TrainingStatus.RUNNING and state.current_digest == "d" * 64
    assert effects[-1] == fx.OpenRound(1)


def test_the_current_rounds_version_gathers_its_results_and_others_are_ignored() -> None:
    state = collecting(phase=RoundPhase.AGGREGATING)
    assert step(state, VersionArrived(committed()), NOW)[1] == [fx.GatherResults(committed())]
    assert step(state, VersionArrived(committed(round=7)), NOW)[1] == []
    done = state.model_copy(update={"completed_rounds": 1})
    assert step(done, VersionArrived(committed()), NOW)[1] == []  # a redelivery
    assert step(collecting(status=TrainingStatus.STOPPED), VersionArrived(committed()), NOW)[1] == []


def release(epsilon: float = 0.4) -> ModelReleased:
    return ModelReleased(training_id="t1", round=1, model_digest="d" * 64, contributions={"agent-00": 10.0},
                         privacy=PrivacyReport(level="high", mechanism="gaussian", epsilon_spent=epsilon))


def test_a_completed_round_records_its_figures_adopts_its_version_and_judges_rollbacks() -> None:
    state = collecting(phase=RoundPhase.AGGREGATING, round_started_at=NOW - 2)
    evaluated = notice("agent-01", evaluation=Evaluation(loss=0.3, accuracy=0.9, num_examples=10))
    results = RoundResults(committed(), (notice(), evaluated), release(), (0.7, 0.6))
    state, effects = step(state, results, NOW)
    (metrics,) = of(effects, fx.AppendMetrics)
    assert (metrics.metrics.participants, metrics.metrics.round_seconds, metrics.metrics.server_accuracy,
            metrics.metrics.eval_accuracy, metrics.metrics.eval_of_version) == (2, 2.0, 0.7, 0.9, 0)
    assert metrics.contributions == {"agent-00": 10.0}
    assert (state.current_version, state.completed_rounds, state.phase) == (1, 1, RoundPhase.IDLE)
    assert state.epsilon_spent == 0.4 and state.best_accuracy == 0.9
    assert of(effects, fx.DiscardUploads)[0].notices == results.notices
    assert effects[-1] == fx.JudgeRollbacks(0.9)
    deferred = state.model_copy(update={"pending_rollback": 0, "completed_rounds": 0, "current_version": 0})
    _, effects = step(deferred.model_copy(update={"phase": RoundPhase.AGGREGATING}), results, NOW)
    assert effects[-1] == fx.ReadVersion(0, "rolled back by operator", automatic=False, eval_accuracy=0.9)


def test_after_a_round_the_next_opens_or_the_evaluation_round_after_the_last() -> None:
    assert step(training(round=1, completed_rounds=1), VersionsScored((), None), NOW)[1] == [fx.OpenRound(2)]
    state, effects = step(training(round=3, completed_rounds=3), VersionsScored((), None), NOW)
    assert state.status is TrainingStatus.EVALUATING and effects[-1] == fx.OpenRound(4)


def test_reaching_the_target_accuracy_ends_training_early() -> None:
    state = training(config={"target_accuracy": 0.8}, round=1, completed_rounds=1)
    assert step(state, VersionsScored((), 0.85), NOW)[0].status is TrainingStatus.EVALUATING
    assert step(state, VersionsScored((), 0.75), NOW)[0].status is TrainingStatus.RUNNING


def test_the_evaluation_round_completes_the_training_with_its_figures() -> None:
    state = collecting(status=TrainingStatus.EVALUATING, round=4)
    evaluated = notice(kind=TaskKind.EVALUATE, round=4)
    state, effects = step(state, EvaluationReported((evaluated,)), NOW)
    assert state.status is TrainingStatus.COMPLETED and state.final_evaluation == evaluated.evaluation
    assert [e.status for e in of(effects, fx.StatusChanged)] == [TrainingStatus.SAVING, TrainingStatus.COMPLETED]
    assert of(effects, fx.Emit)[0].kind == "training_completed"


def test_adaptive_clipping_moves_the_clip_norm_by_the_unclipped_count() -> None:
    state = collecting(config={"adaptive_clipping": {"target_quantile": 0.5, "learning_rate": 0.2}},
                       clip_norm=1.0, phase=RoundPhase.AGGREGATING)
    notices = tuple(notice(f"agent-0{i}", unclipped=True) for i in range(4))
    new, _ = step(state, RoundResults(committed(), notices, None, None), NOW)
    assert new.clip_norm is not None and new.clip_norm < 1.0  # every update was within: the norm shrinks


# -- finishing and the clock --------------------------------------------------------------


@pytest.mark.parametrize("status", [TrainingStatus.STOPPED, TrainingStatus.FAILED])
def test_finishing_leaves_the_active_set_and_frees_a_slot(status: TrainingStatus) -> None:
    state, effects = step(collecting(), FinishRequested(status, "operator"), NOW)
    assert (state.status, state.reason, state.phase) == (status, "operator", RoundPhase.IDLE)
    assert effects[0] == fx.Save(active=False) and effects[-1] == fx.ActivateQueued()
    assert not of(effects, fx.Emit)  # training_completed is only for completed trainings


def test_agents_that_stop_heartbeating_before_answering_are_reported_once() -> None:
    state = collecting(responded=["agent-00"])
    alive = frozenset(AGENTS[2:])
    state, effects = step(state, AgentsAlive(alive), NOW)
    assert state.dropped == ["agent-01"]
    assert of(effects, fx.RecordOutcome) == [fx.RecordOutcome("agent-01", completed=False)]
    assert step(state, AgentsAlive(alive), NOW)[1] == []


def test_a_copy_for_update_shares_nothing_a_step_changes() -> None:
    state = collecting(secure=SecureRoundState(attempt=1), in_flight={"agent-00": 1.0})
    copy = state.copy_for_update()
    copy.selected.append("agent-09")
    copy.in_flight["agent-01"] = 2.0
    assert copy.secure is not None
    copy.secure.share_senders.append("agent-00")
    assert state.selected == list(AGENTS[:5]) and state.in_flight == {"agent-00": 1.0}
    assert state.secure is not None and state.secure.share_senders == []
    assert copy.config is state.config  # frozen: shared


# -- buffered (FedBuff) trainings -----------------------------------------------------------


def buffered(**overrides: Any) -> TrainingState:
    config = {"algorithm": "fedbuff", "algorithm_params": {"buffer_size": 3}, **overrides.pop("config", {})}
    fields: dict[str, Any] = {"round": 1, "phase": RoundPhase.COLLECTING, "config": config, **overrides}
    return training(**fields)


def test_opening_a_buffer_keeps_clients_per_round_agents_training() -> None:
    state, effects = step(training(config={"algorithm": "fedbuff"}), BufferCandidates(AGENTS, open_buffer=1), NOW)
    assert (state.round, state.phase, state.attempt) == (1, RoundPhase.COLLECTING, 1)
    tasks = of(effects, fx.SendTasks)[0].tasks
    assert len(tasks) == 4 and set(state.in_flight) == {agent for agent, _ in tasks}
    assert set(state.in_flight.values()) == {NOW + 30} and effects[-1] == fx.TallyBuffer()


def test_a_refill_forgets_overdue_tasks_and_asks_others() -> None:
    state = buffered(in_flight={"agent-00": NOW - 1, "agent-01": NOW + 10},
                     in_flight_attempt={"agent-00": 1, "agent-01": 1}, attempt=1)
    state, effects = step(state, BufferCandidates(AGENTS), NOW)
    assert "agent-01" in state.in_flight and len(state.in_flight) == 4
    assert state.in_flight["agent-00" if "agent-00" in state.in_flight else "agent-01"] > NOW - 1
    assert of(effects, fx.SendTasks)


def test_a_buffered_training_without_agents_pauses_then_resumes() -> None:
    state, effects = step(buffered(), BufferCandidates(()), NOW)
    assert state.status is TrainingStatus.PAUSED and of(effects, fx.StatusChanged)
    state, effects = step(state, BufferCandidates(AGENTS), NOW)
    assert state.status is TrainingStatus.RUNNING and of(effects, fx.SendTasks)


def test_a_buffered_update_goes_through_the_common_acceptance_path() -> None:
    state = buffered(in_flight={"agent-00": NOW + 10}, in_flight_attempt={"agent-00": 2})
    state, effects = step(state, NoticeArrived(notice(attempt=2), "1-0", volunteer=False), NOW)
    assert state.in_flight == {} and effects == [fx.CheckUpdate(notice(attempt=2), "1-0", 1)]
    state, effects = step(state, NoticeChecked(notice(attempt=2), "1-0", None), NOW)
    assert effects == [fx.AcceptUpdate(notice(attempt=2), "1-0", 1), fx.Save(),
                       fx.RecordOutcome("agent-00", completed=True), fx.Refill()]


def test_updates_arriving_while_a_buffer_is_aggregated_fill_the_next() -> None:
    state = buffered(phase=RoundPhase.AGGREGATING, in_flight={"agent-00": NOW + 10}, in_flight_attempt={"agent-00": 1})
    _, effects = step(state, NoticeArrived(notice(), "1-0", volunteer=False), NOW)
    assert effects == [fx.CheckUpdate(notice(), "1-0", 2)]


def test_a_buffered_update_without_a_task_in_flight_is_refused_quietly() -> None:
    _, effects = step(buffered(), NoticeArrived(notice(), "1-0", volunteer=False), NOW)
    (reject,) = of(effects, fx.Reject)
    assert reject.reason == "not_selected" and reject.severity.value == "info"


def test_a_too_stale_buffered_update_is_refused_and_its_slot_refilled() -> None:
    state = buffered(current_version=20, in_flight={"agent-00": NOW + 10}, in_flight_attempt={"agent-00": 1})
    state, effects = step(state, NoticeArrived(notice(received_model_version=5), "1-0", volunteer=False), NOW)
    assert of(effects, fx.Reject)[0].reason == "stale_round" and effects[-1] == fx.Refill()
    assert state.in_flight == {}


def test_a_volunteers_update_is_taken_as_its_own_task() -> None:
    state, effects = step(buffered(), NoticeArrived(notice("http-1"), "1-0", volunteer=True), NOW)
    assert of(effects, fx.CheckUpdate) and "http-1" not in state.in_flight


def test_a_full_buffer_becomes_a_job_with_its_buffer_size() -> None:
    assert step(buffered(), BufferTallied(2), NOW)[1] == []
    assert step(buffered(), BufferTallied(3), NOW)[1] == [fx.CloseRound()]
    notices = tuple(notice(f"agent-0{i}") for i in range(5))
    _, effects = step(buffered(attempt=4), RoundUpdates(notices), NOW)
    assert of(effects, fx.WriteJob)[0].job.algorithm_params["buffer_size"] == 5


# -- rollbacks ---------------------------------------------------------------------------------


def version_record(version: int) -> VersionRecord:
    return VersionRecord(training_id="t1", version=version, round=version, parent_version=None,
                         model_digest=f"{version:x}" * 64, state_digest=None, checkpoint="", algorithm="fedavg",
                         contributors=[], num_examples=0, created_at=NOW,
                         privacy=PrivacyReport(level="none", mechanism="none"))


def scores(*accuracies: float) -> tuple[VersionScore, ...]:
    return tuple(VersionScore(version, accuracy, None) for version, accuracy in enumerate(accuracies))


def test_the_policy_rolls_back_after_consecutive_degradations_then_goes_on() -> None:
    state = training(config={"rollback": {"consecutive_degradations": 2}}, round=4, completed_rounds=4,
                     current_version=4)
    state, effects = step(state, VersionsScored(scores(0.5, 0.9, 0.5, 0.4), 0.4), NOW)
    (read,) = effects
    assert read == fx.ReadVersion(1, getattr(read, "reason", ""), automatic=True, eval_accuracy=0.4)
    assert state.last_rollback_at_version == 3
    state, effects = step(state, RollbackTarget(version_record(1), "degraded", True, 0.4), NOW)
    assert (state.current_version, state.current_digest) == (1, "1" * 64)
    assert of(effects, fx.RolledBack) == [fx.RolledBack(4, 1, "degraded", automatic=True)]
    assert effects[-1] == fx.OpenRound(5)


def test_the_policy_leaves_improving_versions_alone() -> None:
    state = training(config={"rollback": {"consecutive_degradations": 2}}, round=2, completed_rounds=2)
    _, effects = step(state, VersionsScored(scores(0.5, 0.6, 0.7), 0.7), NOW)
    assert effects == [fx.OpenRound(3)]


def rollback(version: int = 1) -> RollbackTraining:
    return RollbackTraining(training_id="t1", version=version, reason="bad model")


def test_an_operator_rollback_restarts_the_collecting_round_from_the_target() -> None:
    state, effects = step(collecting(current_version=3), RollbackRequested(rollback(), "9-0", version_record(1)), NOW)
    assert state.current_version == 1 and state.handled_requests == ["9-0"]
    assert fx.ClearRoundUpdates(1) in effects and effects[-1] == fx.OpenRound(2)
    assert step(state, RollbackRequested(rollback(), "9-0", version_record(1)), NOW)[1] == []  # a redelivery


def test_an_operator_rollback_while_aggregating_waits_for_the_round() -> None:
    state = collecting(phase=RoundPhase.AGGREGATING, current_version=3)
    state, effects = step(state, RollbackRequested(rollback(), "9-0", version_record(1)), NOW)
    assert (state.pending_rollback, state.current_version, effects) == (1, 3, [fx.Save()])
    state, effects = step(state, RollbackTarget(version_record(1), "rolled back by operator", False, None), NOW)
    assert state.pending_rollback is None and state.current_version == 1


def test_a_rollback_to_a_missing_version_or_of_a_finished_training_is_refused() -> None:
    _, effects = step(collecting(), RollbackRequested(rollback(7), "9-0", None), NOW)
    assert of(effects, fx.Reject)[0].reason == "unknown_version"
    _, effects = step(collecting(status=TrainingStatus.COMPLETED), RollbackRequested(rollback(), "9-0", None), NOW)
    assert of(effects, fx.Reject)[0].reason == "unknown_training"


# -- version 0 ---------------------------------------------------------------------------------


def first_agent(**overrides: Any) -> TrainingState:
    fields: dict[str, Any] = {"config": {"model": {"from_first_agent": True}}, "status": TrainingStatus.INITIALIZING,
                              "current_version": None, "current_digest": None, **overrides}
    return training(**fields)


def test_a_first_agent_training_asks_one_live_agent_for_its_parameters() -> None:
    state, effects = step(first_agent(), ParameterCandidates(AGENTS), NOW)
    ((agent, task),) = of(effects, fx.SendTasks)[0].tasks
    assert task.kind is TaskKind.PARAMETERS and task.model_digest is None and state.selected == [agent]
    assert (state.phase, state.deadline_at) == (RoundPhase.COLLECTING, NOW + 30)
    assert step(state, ParameterCandidates(AGENTS), NOW + 1)[1] == []  # waits for it until its deadline
    later, effects = step(state, ParameterCandidates(AGENTS), NOW + 31)
    assert len(later.selected) == 2 and of(effects, fx.SendTasks)


def test_without_live_agents_the_training_says_what_it_waits_for_once() -> None:
    state, effects = step(first_agent(), ParameterCandidates(()), NOW)
    assert "waiting for a live agent" in state.reason and effects == [fx.Save()]
    assert step(state, ParameterCandidates(()), NOW)[1] == []


def test_unusable_parameters_ask_the_next_agent_at_once_only_while_one_was_not_asked() -> None:
    state, _ = step(first_agent(), ParameterCandidates(AGENTS[:2]), NOW)
    state, effects = step(state, ParametersUnusable(state.selected[0], state.attempt), NOW)
    assert effects == [fx.AskForParameters(after_refusal=True)]
    state, _ = step(state, ParameterCandidates(AGENTS[:2], after_refusal=True), NOW)
    assert len(state.selected) == 2
    _, effects = step(state, ParameterCandidates(AGENTS[:2], after_refusal=True), NOW)
    assert effects == []  # everyone asked: the deadline paces the next try


def test_parameters_from_an_agent_not_asked_are_refused_but_a_volunteers_are_checked() -> None:
    parameters = notice("agent-09", round=0, kind=TaskKind.PARAMETERS, update_digest="b" * 64)
    _, effects = step(first_agent(), ParametersArrived(parameters, volunteer=False), NOW)
    assert of(effects, fx.Reject)[0].reason == "not_selected"
    assert step(first_agent(), ParametersArrived(parameters, volunteer=True), NOW)[1] == [fx.CheckParameters(parameters)]


def test_a_stored_initial_model_fixes_the_layout_and_is_released_as_version_zero() -> None:
    state, effects = step(first_agent(phase=RoundPhase.COLLECTING, selected=["agent-01"]),
                          InitialModelStored("c" * 64, {"w": ((4, 2), "float32")}, from_agent="agent-01"), NOW)
    assert state.layer_spec == {"w": ((4, 2), "float32")} and state.selected == [] and state.phase is RoundPhase.IDLE
    (release,) = of(effects, fx.ReleaseModel)
    assert (release.release.round, release.release.model_digest) == (0, "c" * 64)
    assert effects[0] == fx.Save(active=True) and of(effects, fx.Emit)[0].kind == "model_layout_fixed"


def test_a_refusal_of_the_model_counts_as_the_agents_answer() -> None:
    refused = ModelRefused(training_id="t1", round=1, attempt=1, agent_id="agent-01", reason="bad_shape",
                           detail="not my model")
    state, effects = step(collecting(), ModelRefusedBy(refused), NOW)
    assert state.responded == ["agent-01"] and effects == [fx.Save(), fx.TallyRound()]
