"""The secure exchange as transitions of the coordinator's state machine: a whole session
walked through ``step`` with real agent sessions, and the refusals (no Redis)."""

from __future__ import annotations

from typing import Any

import numpy as np

from federated_learning.coordination import effects as fx
from federated_learning.coordination.inputs import (
    KeysCollected,
    SecureMessageArrived,
    SecureTallied,
    SharesCollected,
    UploadersCollected,
)
from federated_learning.coordination.machine import step
from federated_learning.coordination.secure import SecurePhase, SecureRoundState
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.privacy.secure_session import AgentSecureSession
from federated_learning.protocol.messages import PresetModel, TrainingConfig, TrainingStatus
from federated_learning.protocol.secure_messages import (
    SecureRoster,
    SecureSharesDelivered,
    SecureUnmaskRequested,
)

NOW = 1_000.0
D = 4 * 2 + 2  # the softmax preset's float values below


def secure_training(agents: list[str], **overrides: Any) -> TrainingState:
    config = TrainingConfig(dataset="digits", model=PresetModel(num_features=4, num_classes=2),
                            secure_aggregation=True, local={"clip_norm": 1.0})  # type: ignore[arg-type]
    fields: dict[str, Any] = {
        "training_id": "t", "config": config, "min_clients": 3, "clients_per_round": len(agents),
        "round_deadline_s": 60.0, "privacy_level": "none", "status": TrainingStatus.RUNNING, "clip_norm": 1.0,
        "current_version": 0, "current_digest": "a" * 64, "round": 1, "attempt": 1, "phase": RoundPhase.COLLECTING,
        "selected": agents, "deadline_at": NOW + 60, "secure": SecureRoundState(attempt=1),
        "layer_spec": {"weights": ((4, 2), "float32"), "bias": ((2,), "float32")}, **overrides}
    return TrainingState(**fields)


def agent_sessions(count: int) -> list[AgentSecureSession]:
    rng = np.random.default_rng(0)
    return [AgentSecureSession(f"a{i}", "t", 1, 1, rng.uniform(-0.1, 0.1, D), 10 + i) for i in range(count)]


def of(effects: list[fx.Effect], kind: type) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def test_a_whole_session_moves_phase_by_phase_and_closes_the_round() -> None:
    agents = agent_sessions(4)
    state = secure_training([a.agent_id for a in agents])
    adverts = [a.advertisement() for a in agents]
    for advert in adverts:
        state, effects = step(state, SecureMessageArrived(advert), NOW)
        assert effects == [fx.StoreSecureMessage(advert), fx.TallySecure()]
    state, effects = step(state, SecureTallied(4), NOW)
    assert effects == [fx.CollectSecure()]
    state, effects = step(state, KeysCollected(tuple(adverts), "ab" * 16), NOW + 1)
    assert state.secure is not None and state.secure.phase is SecurePhase.SHARES
    assert state.secure.session is not None and state.secure.session.session_id == "ab" * 16
    assert state.deadline_at == NOW + 1 + 30  # a phase waits at most SECURE_PHASE_TIMEOUT_S
    rosters = dict(of(effects, fx.SendMessages)[0].messages)
    assert sorted(rosters) == [a.agent_id for a in agents]
    roster = rosters["a0"]
    assert isinstance(roster, SecureRoster)
    submissions = [a.on_roster(roster) for a in agents]
    state, effects = step(state, SecureTallied(4), NOW + 2)
    assert effects == [fx.CollectSecure()]
    state, effects = step(state, SharesCollected(tuple(submissions)), NOW + 2)
    assert state.secure is not None and state.secure.phase is SecurePhase.MASKED
    delivered = dict(of(effects, fx.SendMessages)[0].messages)
    assert all(isinstance(m, SecureSharesDelivered) and len(m.shares) == 3 for m in delivered.values())
    state, effects = step(state, SecureTallied(3), NOW + 3)  # one agent dropped after sharing
    assert effects == []  # waits for it until the phase deadline
    state, effects = step(state, SecureTallied(3), NOW + 40)
    assert effects == [fx.CollectSecure()]
    state, effects = step(state, UploadersCollected(("a0", "a1", "a2")), NOW + 40)
    request = dict(of(effects, fx.SendMessages)[0].messages)["a0"]
    assert isinstance(request, SecureUnmaskRequested) and request.dropped == ["a3"]
    assert of(effects, fx.Emit)[0].kind == "secure_dropouts"
    state, effects = step(state, SecureTallied(3), NOW + 41)
    assert effects == [fx.CloseRound()]


def test_messages_of_another_phase_or_attempt_are_stale() -> None:
    agents = agent_sessions(3)
    state = secure_training([a.agent_id for a in agents])
    other_attempt = agents[0].advertisement().model_copy(update={"attempt": 2})
    _, effects = step(state, SecureMessageArrived(other_attempt), NOW)
    assert of(effects, fx.Reject)[0].reason == "stale_round"


def test_an_agent_not_asked_or_a_repeated_key_is_refused() -> None:
    agents = agent_sessions(3)
    state = secure_training(["a0", "a1"])
    _, effects = step(state, SecureMessageArrived(agents[2].advertisement()), NOW)
    assert of(effects, fx.Reject)[0].reason == "bad_secure_message"
    advert = agents[0].advertisement()
    _, effects = step(state, SecureMessageArrived(advert, {advert.cipher_public_key: "a1"}), NOW)
    assert "repeat" in of(effects, fx.Reject)[0].detail


def test_too_few_keys_by_the_deadline_start_a_new_session() -> None:
    state = secure_training(["a0", "a1", "a2", "a3"])
    state, effects = step(state, SecureTallied(2), NOW + 61)
    assert state.secure is None and state.retries == 1
    assert effects[0] == fx.ClearRoundUpdates(1) and effects[-1] == fx.OpenRound(1, retry=True)


def test_a_session_short_after_every_attempt_fails_the_training() -> None:
    state = secure_training(["a0", "a1", "a2", "a3"], retries=2)
    state, _ = step(state, SecureTallied(2), NOW + 61)
    assert state.status is TrainingStatus.FAILED and "secure phase keys had 2 answers" in state.reason
