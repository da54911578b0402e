"""Secure-aggregation rounds as transitions of the coordinator's state machine (the transport
of Bonawitz et al. 2017).

The coordinator relays keys and sealed shares between the round's agents and tells the
aggregator which masked uploads and unmask shares make up the round; it never sees an
agent's update in the clear. Every agent message is stored per (training, round, attempt)
before it counts (``StoreSecureMessage``), so a restarted coordinator resumes the exchange
where it stood; a retry starts a new session. The checks and phase decisions are in
:mod:`federated_learning.coordination.secure`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from federated_learning.coordination.effects import (
    ClearRoundUpdates,
    CloseRound,
    CollectSecure,
    Effect,
    Emit,
    OpenRound,
    Reject,
    Save,
    SendMessages,
    StoreSecureMessage,
    TallySecure,
)
from federated_learning.coordination.inputs import (
    KeysCollected,
    SecureMessageArrived,
    SecureTallied,
    SharesCollected,
    UploadersCollected,
)
from federated_learning.coordination.lifecycle import finish
from federated_learning.coordination.rounds import RoundDecision, decide_round
from federated_learning.coordination.secure import (
    SECURE_PHASE_TIMEOUT_S,
    SecurePhase,
    SecureRoundState,
    build_session,
    check_keys,
    check_shares,
    check_unmask,
    decide_phase,
    deliveries,
)
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.protocol.messages import (
    MIN_SECURE_CLIENTS,
    Severity,
    TrainingStatus,
    UpdateSubmitted,
)
from federated_learning.protocol.secure_messages import (
    SecureAgentMessage,
    SecureKeysAdvertised,
    SecureRoster,
    SecureSharesDelivered,
    SecureSharesSubmitted,
    SecureUnmaskRequested,
    SecureUnmaskShares,
)
from federated_learning.protocol.tensors import is_float

Transition = tuple[TrainingState, list[Effect]]

PHASE_OF = {"secure_keys": SecurePhase.KEYS, "secure_shares": SecurePhase.SHARES,
            "secure_unmask_shares": SecurePhase.UNMASK}
PART_OF = {SecurePhase.KEYS: "keys", SecurePhase.SHARES: "shares", SecurePhase.UNMASK: "unmask"}
"""Where each phase's messages are stored (``Keys.secure_exchange``'s part)."""


def vector_length(state: TrainingState) -> int:
    """Values in a masked update: the float layers' (integer layers are not masked; they keep
    the global model's values in secure trainings)."""
    return sum(int(np.prod(shape)) for shape, dtype in state.layer_spec.values() if is_float(dtype))


def needed(state: TrainingState) -> int:
    assert state.secure is not None
    return max(state.secure.threshold, state.min_clients, MIN_SECURE_CLIENTS)


# -- agents' messages ------------------------------------------------------------------------


def late_unmask(state: TrainingState, message: SecureAgentMessage) -> bool:
    """Unmask shares after the round went on with the threshold of them: not needed."""
    secure = state.secure
    return (isinstance(message, SecureUnmaskShares) and secure is not None
            and secure.phase is SecurePhase.UNMASK and state.phase is not RoundPhase.COLLECTING
            and (message.round, message.attempt) == (state.round, secure.attempt))


def stale(state: TrainingState, message: SecureAgentMessage) -> str | None:
    secure = state.secure
    if (not state.config.secure_aggregation or secure is None or state.phase is not RoundPhase.COLLECTING
            or (message.round, message.attempt) != (state.round, secure.attempt)
            or PHASE_OF[message.type] is not secure.phase):
        where = f"round {state.round}" + (f" attempt {secure.attempt}" if secure else "") + (
            f", secure phase {secure.phase.value}" if secure else "")
        return f"{message.type} for round {message.round} attempt {message.attempt}; training is in {where}"
    return None


def screen_message(state: TrainingState, given: SecureMessageArrived) -> Transition:
    """Store a message of the current phase (then see whether the phase is complete), drop a
    late unmask share, refuse the rest with the reason."""
    message = given.message
    if late_unmask(state, message):
        return state, []
    where = stale(state, message)
    if where is not None:
        return state, [_refuse(message, "stale_round", where)]
    secure = state.secure
    assert secure is not None
    if isinstance(message, SecureKeysAdvertised):
        detail = check_keys(message, state.selected, dict(given.key_owners))
    elif isinstance(message, SecureSharesSubmitted):
        assert secure.session is not None
        detail = check_shares(message, secure.session)
    else:
        assert secure.session is not None
        detail = check_unmask(message, secure.session, secure.share_senders, secure.survivors)
    if detail is not None:
        return state, [_refuse(message, "bad_secure_message", detail)]
    return state, [StoreSecureMessage(message), TallySecure()]


def _refuse(message: SecureAgentMessage, reason: str, detail: str) -> Reject:
    return Reject("updates", reason, detail, message.training_id, message.round, message.agent_id)


def masked_upload_problem(state: TrainingState, notice: UpdateSubmitted) -> tuple[str, str] | None:
    """Why a masked upload is refused before its blob is read (wrong phase or attempt, not a
    share sender, another example count than advertised), or None."""
    secure = state.secure
    if secure is None or secure.phase is not SecurePhase.MASKED or secure.session is None:
        return "stale_round", "no masked uploads are taken in this phase of the secure round"
    if notice.attempt != secure.attempt:
        return "stale_round", f"masked upload of attempt {notice.attempt}; the session is attempt {secure.attempt}"
    if notice.agent_id not in secure.share_senders:
        return "not_selected", "agent sent no shares in this secure round"
    member = next(m for m in secure.session.members if m.agent_id == notice.agent_id)
    if notice.num_examples != member.num_examples:
        return "bad_secure_message", (f"upload claims {notice.num_examples} examples; the agent "
                                      f"advertised {member.num_examples}")
    return None


# -- phases ------------------------------------------------------------------------------------


def tally(state: TrainingState, given: SecureTallied, now: float) -> Transition:
    """Move the exchange on when its phase has what it needs; retry or give up at its deadline."""
    secure = state.secure
    if secure is None or state.phase is not RoundPhase.COLLECTING:
        return state, []
    common: dict[str, Any] = {"now": now, "deadline_at": state.deadline_at, "attempt": state.retries + 1,
                              "max_attempts": state.config.max_round_attempts}
    arrived = given.arrived
    if secure.phase is SecurePhase.KEYS:
        decision = decide_round(accepted=arrived, responded=arrived, selected=len(state.selected),
                                target=state.clients_per_round,
                                min_clients=max(state.min_clients, MIN_SECURE_CLIENTS), **common)
    else:
        expected = {SecurePhase.SHARES: len(secure.members), SecurePhase.MASKED: len(secure.share_senders),
                    SecurePhase.UNMASK: len(secure.survivors)}[secure.phase]
        decision = decide_phase(arrived=arrived, expected=expected,
                                needed=secure.threshold if secure.phase is SecurePhase.UNMASK else needed(state),
                                early_at_needed=secure.phase is SecurePhase.UNMASK, **common)
    if decision is RoundDecision.WAIT:
        return state, []
    if decision is RoundDecision.RETRY:
        return restart(state, f"secure phase {secure.phase.value}: {arrived} answers by the deadline")
    if decision is RoundDecision.FAIL:
        return finish(state, TrainingStatus.FAILED,
                      f"round {state.round}: secure phase {secure.phase.value} had {arrived} answers after "
                      f"{state.retries + 1} attempts; needs {needed(state)}")
    if secure.phase is SecurePhase.UNMASK:
        return state, [CloseRound()]
    return state, [CollectSecure()]


def _next_phase(state: TrainingState, secure: SecureRoundState, phase: SecurePhase, now: float) -> None:
    secure.phase = phase
    state.deadline_at = now + min(SECURE_PHASE_TIMEOUT_S, state.round_deadline_s)


def publish_roster(state: TrainingState, given: KeysCollected, now: float) -> Transition:
    """Everyone who advertised keys makes the session's roster."""
    secure = state.secure
    assert secure is not None and state.clip_norm is not None
    secure.session = build_session(list(given.advertised), threshold_fraction=state.config.secure_threshold,
                                   vector_length=vector_length(state), clip_range=state.clip_norm,
                                   counts_unclipped=state.config.adaptive_clipping is not None,
                                   session_id=given.session_id)
    _next_phase(state, secure, SecurePhase.SHARES, now)
    roster = SecureRoster(training_id=state.training_id, round=state.round, attempt=secure.attempt,
                          session=secure.session)
    return state, [SendMessages(tuple((member, roster) for member in secure.members)), Save(),
                   Emit("secure_roster", f"round {state.round}: {len(secure.members)} agents in the secure "
                        f"session, threshold {secure.threshold}",
                        data={"members": len(secure.members), "threshold": secure.threshold})]


def deliver_shares(state: TrainingState, given: SharesCollected, now: float) -> Transition:
    """Each share sender receives the shares the other senders sealed for it."""
    secure = state.secure
    assert secure is not None
    secure.share_senders = sorted(s.agent_id for s in given.submissions)
    _next_phase(state, secure, SecurePhase.MASKED, now)
    base = {"training_id": state.training_id, "round": state.round, "attempt": secure.attempt}
    messages = tuple((recipient, SecureSharesDelivered(shares=shares, **base))  # type: ignore[arg-type]
                     for recipient, shares in deliveries(list(given.submissions)).items())
    return state, [SendMessages(messages), Save()]


def request_unmasking(state: TrainingState, given: UploadersCollected, now: float) -> Transition:
    """The uploaders (survivors) send the shares that remove the masks, the dropped agents' too."""
    secure = state.secure
    assert secure is not None
    secure.survivors = sorted(given.uploaders)
    dropped = sorted(set(secure.share_senders) - set(secure.survivors))
    _next_phase(state, secure, SecurePhase.UNMASK, now)
    request = SecureUnmaskRequested(training_id=state.training_id, round=state.round, attempt=secure.attempt,
                                    survivors=secure.survivors, dropped=dropped)
    effects: list[Effect] = [SendMessages(tuple((survivor, request) for survivor in secure.survivors)), Save()]
    if dropped:
        effects.append(Emit("secure_dropouts", f"round {state.round}: {len(dropped)} agents dropped out after "
                            "sharing keys; their masks are removed from the survivors' shares",
                            Severity.WARNING, data={"dropped": dropped}))
    return state, effects


def restart(state: TrainingState, why: str) -> Transition:
    """Abandon the session (masked uploads of a failed session are useless) and select anew.
    One transaction: a crash after it leaves a round without a session, which the tick
    retries; never a session whose uploads are gone."""
    state.retries += 1
    state.secure = None
    state.selected, state.responded = [], []
    return state, [ClearRoundUpdates(state.round), Save(),
                   Emit("secure_round_restarted", f"round {state.round}: {why}; new session", Severity.WARNING),
                   OpenRound(state.round, retry=True)]
