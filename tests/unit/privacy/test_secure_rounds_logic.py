"""The secure round's pure parts: phase decisions, roster building, message checks, and a
whole session run through the wire messages (agents' and aggregator's sides)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from federated_learning.coordination.rounds import RoundDecision
from federated_learning.coordination.secure import (
    build_session,
    check_keys,
    check_shares,
    check_unmask,
    decide_phase,
    deliveries,
)
from federated_learning.privacy.errors import InsufficientSurvivors, ProtocolViolation
from federated_learning.privacy.secure_aggregation import FixedPointCodec
from federated_learning.privacy.secure_session import (
    AgentSecureSession,
    UnmaskedRound,
    decode_unclipped_count,
    fixed_point_scale,
    session_threshold,
    unmask_weighted_mean,
)
from federated_learning.protocol.messages import SecureAggregationSpec, TrainingConfig
from federated_learning.protocol.secure_messages import (
    SecureRoster,
    SecureSharesDelivered,
    SecureUnmaskRequested,
)

D = 257


def clipped(delta: np.ndarray, norm: float = 1.0) -> np.ndarray:
    return delta * min(1.0, norm / float(np.linalg.norm(delta)))


def sessions(count: int, seed: int = 0) -> list[AgentSecureSession]:
    """Agents holding deltas clipped to L2 norm 1 (the session's clip range), as agents clip them."""
    rng = np.random.default_rng(seed)
    return [AgentSecureSession(f"a{i}", "t", 1, 1, clipped(rng.uniform(-0.5, 0.5, D)), int(rng.integers(5, 50)))
            for i in range(count)]


def run(agents: list[AgentSecureSession], *, drop_after_shares: set[str] = frozenset(),
        fraction: float = 2 / 3, counts_unclipped: bool = False
        ) -> tuple[UnmaskedRound, np.ndarray, SecureAggregationSpec]:
    """All four phases through the messages; returns (unmasked round, plain weighted mean, spec)."""
    session = build_session([a.advertisement() for a in agents], threshold_fraction=fraction,
                            vector_length=D, clip_range=1.0, counts_unclipped=counts_unclipped)
    roster = SecureRoster(training_id="t", round=1, attempt=1, session=session)
    submissions = [a.on_roster(roster) for a in agents]
    assert all(check_shares(s, session) is None for s in submissions)
    inbox = deliveries(submissions)
    survivors = [a for a in agents if a.agent_id not in drop_after_shares]
    masked = {a.agent_id: a.on_delivery(SecureSharesDelivered(training_id="t", round=1, attempt=1,
                                                              shares=inbox[a.agent_id]))
              for a in survivors}
    request = SecureUnmaskRequested(training_id="t", round=1, attempt=1, survivors=sorted(masked),
                                    dropped=sorted(drop_after_shares))
    responses = [a.on_unmask(request) for a in survivors]
    senders = [s.agent_id for s in submissions]
    assert all(check_unmask(r, session, senders, sorted(masked)) is None for r in responses)
    spec = SecureAggregationSpec(session=session, attempt=1, share_senders=senders,
                                 responders=[r.agent_id for r in responses])
    unmasked = unmask_weighted_mean(spec, masked, responses[: session.threshold])
    weights = np.array([a.num_examples for a in survivors], dtype=np.float64)
    plain = sum(w * a.delta for w, a in zip(weights, survivors, strict=True)) / weights.sum()
    return unmasked, plain, spec


def test_unmasked_mean_equals_the_weighted_mean_within_rounding() -> None:
    unmasked, plain, spec = run(sessions(6))
    assert np.max(np.abs(unmasked.mean - plain)) <= 6 / spec.session.scale
    assert spec.session.threshold == 5
    assert unmasked.unclipped_count is None


def test_agents_that_drop_after_sharing_are_unmasked_from_the_survivors() -> None:
    agents = sessions(7, seed=1)
    unmasked, plain, spec = run(agents, drop_after_shares={"a2", "a5"})
    assert np.max(np.abs(unmasked.mean - plain)) <= 7 / spec.session.scale


def test_only_the_count_of_unclipped_updates_is_unmasked() -> None:
    agents = sessions(7, seed=4)
    for i, agent in enumerate(agents):
        agent.unclipped = i % 3 == 0  # a0, a3, a6
    unmasked, plain, spec = run(agents, drop_after_shares={"a3"}, counts_unclipped=True)

    assert spec.session.vector_length == D + 1
    assert unmasked.unclipped_count == 2  # a0 and a6 among the survivors
    assert unmasked.mean.shape == (D,)
    assert np.max(np.abs(unmasked.mean - plain)) <= 7 / spec.session.scale


def test_a_session_that_counts_unclipped_updates_needs_the_bit() -> None:
    agents = sessions(3, seed=5)
    session = build_session([a.advertisement() for a in agents], threshold_fraction=2 / 3,
                            vector_length=D, clip_range=1.0, counts_unclipped=True)
    with pytest.raises(ProtocolViolation, match="not clipped"):
        agents[0].on_roster(SecureRoster(training_id="t", round=1, attempt=1, session=session))


def test_a_clip_value_other_than_zero_or_the_range_moves_the_count_by_at_most_one() -> None:
    session = build_session([a.advertisement() for a in sessions(5)], threshold_fraction=2 / 3,
                            vector_length=D, clip_range=1.5, counts_unclipped=True)
    one = round(1.5 * session.scale) / session.scale  # what the clip range decodes to
    assert decode_unclipped_count(3 * one, session, 5) == 3
    assert decode_unclipped_count(3 * one + 0.6 * 1.5, session, 5) in (3, 4)  # one member sent 0.6 C
    assert decode_unclipped_count(-1.5, session, 5) == 0
    assert decode_unclipped_count(9 * one, session, 5) == 5


def test_fewer_survivors_than_the_threshold_cannot_unmask() -> None:
    with pytest.raises(InsufficientSurvivors):
        run(sessions(6), drop_after_shares={"a0", "a1", "a2"})


def test_a_masked_upload_looks_uniform() -> None:
    agents = sessions(4)
    session = build_session([a.advertisement() for a in agents], threshold_fraction=2 / 3,
                            vector_length=D, clip_range=1.0)
    roster = SecureRoster(training_id="t", round=1, attempt=1, session=session)
    inbox = deliveries([a.on_roster(roster) for a in agents])
    masked = agents[0].on_delivery(SecureSharesDelivered(training_id="t", round=1, attempt=1, shares=inbox["a0"]))
    encoded = FixedPointCodec(session.scale, 1.0).encode(agents[0].delta * agents[0].num_examples
                                                         / session.weight_normaliser)
    assert not np.array_equal(masked, encoded)
    # top bits of uint32 words: uniform in {0..15}; the encoded update alone would pile up at 0 and 15
    counts = np.bincount(masked >> 28, minlength=16)
    assert counts.min() > 0 and counts.max() < 3 * D / 16


def test_fixed_point_scale_never_lets_the_sum_wrap() -> None:
    for members, clip in [(3, 10.0), (69, 1.0), (10_000, 0.5), (24, 123.4)]:
        scale = fixed_point_scale(members, clip)
        assert members * round(clip * scale) <= 2**31 - 1
        assert members * round(clip * scale * 2) > 2**31 - 1  # and it is the finest such power of two


def test_threshold_is_a_majority_and_at_least_two() -> None:
    assert session_threshold(3, 2 / 3) == 3
    assert session_threshold(24, 2 / 3) == 17
    assert session_threshold(2, 0.51) == 2


def test_phase_goes_on_when_everyone_answered_or_at_the_deadline_with_enough() -> None:
    common = {"attempt": 1, "max_attempts": 3, "deadline_at": 100.0}
    assert decide_phase(arrived=5, expected=5, needed=4, now=0.0, **common) is RoundDecision.AGGREGATE
    assert decide_phase(arrived=4, expected=5, needed=4, now=0.0, **common) is RoundDecision.WAIT
    assert decide_phase(arrived=4, expected=5, needed=4, now=0.0, early_at_needed=True,
                        **common) is RoundDecision.AGGREGATE
    assert decide_phase(arrived=4, expected=5, needed=4, now=100.0, **common) is RoundDecision.AGGREGATE
    assert decide_phase(arrived=3, expected=5, needed=4, now=100.0, **common) is RoundDecision.RETRY
    assert decide_phase(arrived=3, expected=5, needed=4, now=100.0, attempt=3, max_attempts=3,
                        deadline_at=100.0) is RoundDecision.FAIL


def test_checks_refuse_messages_that_do_not_fit_the_session() -> None:
    agents = sessions(4)
    adverts = [a.advertisement() for a in agents]
    fresh = {adverts[0].cipher_public_key: None, adverts[0].mask_public_key: None}
    assert check_keys(adverts[0], ["a1", "a2"], fresh) == "agent was not asked in this round"
    assert check_keys(adverts[0], ["a0"], fresh) is None
    copied = adverts[1].model_copy(update={"agent_id": "a0"})  # a1's keys, advertised again by a0
    assert "repeat" in (check_keys(copied, ["a0", "a1"], {adverts[1].cipher_public_key: "a1",
                                                          adverts[1].mask_public_key: "a1"}) or "")
    same = adverts[0].model_copy(update={"mask_public_key": adverts[0].cipher_public_key})
    assert "repeat" in (check_keys(same, ["a0"], {same.cipher_public_key: None}) or "")
    session = build_session(adverts, threshold_fraction=2 / 3, vector_length=D, clip_range=1.0)
    shares = agents[0].on_roster(SecureRoster(training_id="t", round=1, attempt=1, session=session))
    short = shares.model_copy(update={"shares": shares.shares[:-1]})
    assert "one share" in (check_shares(short, session) or "")
    outsider = shares.model_copy(update={"agent_id": "zz"})
    assert check_shares(outsider, session) == "agent is not in the round's roster"


def test_a_roster_with_other_keys_for_the_agent_is_refused() -> None:

    agents = sessions(3)
    adverts = [a.advertisement() for a in agents]
    session = build_session(adverts, threshold_fraction=2 / 3, vector_length=D, clip_range=1.0)
    swapped = session.model_copy(update={"members": [
        session.members[0].model_copy(update={"mask_public_key": session.members[1].mask_public_key}),
        *session.members[1:]]})
    with pytest.raises(ProtocolViolation):
        agents[0].on_roster(SecureRoster(training_id="t", round=1, attempt=1, session=swapped))


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"algorithm": "krum"}, "secure aggregation reveals only the weighted mean"),
    ({"algorithm": "fedbuff"}, "secure aggregation reveals only the weighted mean"),
    ({"local": {"compression": "top_k"}}, "compression is refused"),
    ({"min_clients": 2}, "min_clients >= 3"),
    ({"privacy_mode": "local", "privacy_level": "low"}, "local DP noise would overflow"),
])
def test_training_configs_that_secure_aggregation_cannot_serve_are_refused(overrides: dict[str, object],
                                                                           needle: str) -> None:
    body = {"dataset": "d", "model": {"num_features": 4, "num_classes": 2}, "secure_aggregation": True,
            **overrides}
    with pytest.raises(ValidationError, match=needle):
        TrainingConfig.model_validate(body)


def test_secure_training_with_central_dp_is_accepted() -> None:
    config = TrainingConfig.model_validate({"dataset": "d", "model": {"num_features": 4, "num_classes": 2},
                                            "secure_aggregation": True, "algorithm": "fedavg",
                                            "privacy_level": "low"})
    assert config.secure_aggregation


def test_a_wrong_self_seed_share_is_caught_instead_of_released() -> None:
    from federated_learning.protocol.secure_messages import ShareValue

    agents = sessions(5, seed=3)
    session = build_session([a.advertisement() for a in agents], threshold_fraction=2 / 3,
                            vector_length=D, clip_range=1.0)
    roster = SecureRoster(training_id="t", round=1, attempt=1, session=session)
    submissions = [a.on_roster(roster) for a in agents]
    inbox = deliveries(submissions)
    masked = {a.agent_id: a.on_delivery(SecureSharesDelivered(training_id="t", round=1, attempt=1,
                                                              shares=inbox[a.agent_id])) for a in agents}
    request = SecureUnmaskRequested(training_id="t", round=1, attempt=1, survivors=sorted(masked), dropped=[])
    responses = [a.on_unmask(request) for a in agents]
    liar = responses[0]
    forged = dict(liar.self_seed_shares)
    forged["a3"] = ShareValue(x=forged["a3"].x, y=format(int(forged["a3"].y, 16) ^ 1, "x"))
    responses[0] = liar.model_copy(update={"self_seed_shares": forged})
    spec = SecureAggregationSpec(session=session, attempt=1, share_senders=[s.agent_id for s in submissions],
                                 responders=[r.agent_id for r in responses])

    with pytest.raises(ProtocolViolation, match="wrong unmask shares"):
        unmask_weighted_mean(spec, masked, responses[: session.threshold])
