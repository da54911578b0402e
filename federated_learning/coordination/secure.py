"""Decisions and checks of a secure-aggregation round (pure; the coordinator does the I/O).

A secure round collects in four phases, each with its own deadline: KEYS (agents that
trained advertise keys), SHARES (roster members send sealed shares), MASKED (share senders
upload masked updates), UNMASK (uploaders send the shares that remove the masks). Each
phase needs at least the session's threshold of answers; short of that at its deadline
the round is retried with a new selection and a new session.
"""

from __future__ import annotations

import os
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from federated_learning.coordination.rounds import RoundDecision
from federated_learning.privacy.secure_session import fixed_point_scale, session_threshold
from federated_learning.protocol.messages import MIN_SECURE_CLIENTS, RosterMember, SecureSession
from federated_learning.protocol.secure_messages import (
    SealedShare,
    SecureKeysAdvertised,
    SecureSharesSubmitted,
    SecureUnmaskShares,
)

SECURE_PHASE_TIMEOUT_S = 30.0
"""Longest wait for the key, share and unmask phases (they take milliseconds when agents
are alive), capped by the training's round deadline."""


DEFAULT_SECURE_CLIP_NORM = 10.0
"""L2 bound of each update in a secure training without a privacy level or local.clip_norm:
masked values are fixed point in [-clip, clip]."""


class SecurePhase(StrEnum):
    KEYS = "keys"
    SHARES = "shares"
    MASKED = "masked"
    UNMASK = "unmask"


class SecureRoundState(BaseModel):
    """Where one round's secure exchange stands (part of the training's durable state)."""

    model_config = ConfigDict(extra="forbid")
    attempt: int = Field(ge=1, description="the round attempt the session belongs to")
    phase: SecurePhase = SecurePhase.KEYS
    session: SecureSession | None = None
    share_senders: list[str] = Field(default_factory=list)
    survivors: list[str] = Field(default_factory=list)

    @property
    def members(self) -> list[str]:
        return [m.agent_id for m in self.session.members] if self.session else []

    @property
    def threshold(self) -> int:
        return self.session.threshold if self.session else MIN_SECURE_CLIENTS


def decide_phase(*, arrived: int, expected: int, needed: int, now: float, deadline_at: float,
                 attempt: int, max_attempts: int, early_at_needed: bool = False) -> RoundDecision:
    """Go on (AGGREGATE) once everyone expected answered, or at the deadline with ``needed``
    answers (or as soon as ``needed`` when ``early_at_needed``); retry or fail short of them."""
    if arrived >= expected or (arrived >= needed and (early_at_needed or now >= deadline_at)):
        return RoundDecision.AGGREGATE
    if now >= deadline_at:
        return RoundDecision.RETRY if attempt < max_attempts else RoundDecision.FAIL
    return RoundDecision.WAIT


def build_session(advertised: list[SecureKeysAdvertised], *, threshold_fraction: float,
                  vector_length: int, clip_range: float, counts_unclipped: bool = False,
                  session_id: str | None = None) -> SecureSession:
    """The roster of everyone who advertised keys, sorted by agent id, with ``session_id`` (a
    fresh random one when None). vector_length: the model's values; one more when the session
    counts unclipped updates."""
    members = [RosterMember(agent_id=a.agent_id, cipher_public_key=a.cipher_public_key,
                            mask_public_key=a.mask_public_key, num_examples=a.num_examples)
               for a in sorted(advertised, key=lambda a: a.agent_id)]
    return SecureSession(
        session_id=session_id or os.urandom(16).hex(), threshold=session_threshold(len(members), threshold_fraction),
        vector_length=vector_length + counts_unclipped, scale=fixed_point_scale(len(members), clip_range),
        clip_range=clip_range, weight_normaliser=max(m.num_examples for m in members),
        counts_unclipped=counts_unclipped, members=members)


def check_keys(message: SecureKeysAdvertised, selected: list[str],
               owners: dict[str, str | None]) -> str | None:
    """Why an advertisement is refused, or None. ``owners``: each of its two public keys -> the
    agent that advertised it earlier in the session (None: nobody)."""
    if message.agent_id not in selected:
        return "agent was not asked in this round"
    if message.cipher_public_key == message.mask_public_key or any(
            owner not in (None, message.agent_id) for owner in owners.values()):
        return "public keys repeat (its own or another agent's)"
    return None


def check_shares(message: SecureSharesSubmitted, session: SecureSession) -> str | None:
    """Why a share submission is refused: sender outside the roster, or not one share per other member."""
    members = [m.agent_id for m in session.members]
    if message.agent_id not in members:
        return "agent is not in the round's roster"
    recipients = sorted(s.recipient for s in message.shares)
    expected = sorted(a for a in members if a != message.agent_id)
    if recipients != expected or any(s.sender != message.agent_id for s in message.shares):
        return f"needs one share from '{message.agent_id}' to each of the {len(expected)} other members"
    return None


def deliveries(submissions: list[SecureSharesSubmitted]) -> dict[str, list[SealedShare]]:
    """The shares each sender receives: those the other senders addressed to it."""
    senders = {s.agent_id for s in submissions}
    inbox: dict[str, list[SealedShare]] = {sender: [] for sender in sorted(senders)}
    for submission in submissions:
        for share in submission.shares:
            if share.recipient in senders:
                inbox[share.recipient].append(share)
    return inbox


def check_unmask(message: SecureUnmaskShares, session: SecureSession, share_senders: list[str],
                 survivors: list[str]) -> str | None:
    """Why unmask shares are refused: not a survivor, or not exactly the shares the request asked for."""
    if message.agent_id not in survivors:
        return "agent did not upload a masked update in this round"
    dropped = sorted(set(share_senders) - set(survivors))
    if sorted(message.mask_key_shares) != dropped or sorted(message.self_seed_shares) != sorted(survivors):
        return "shares must cover exactly the dropped agents' mask keys and the survivors' self seeds"
    own_x = [m.agent_id for m in session.members].index(message.agent_id) + 1
    if any(v.x != own_x for v in (*message.mask_key_shares.values(), *message.self_seed_shares.values())):
        return f"shares must carry the agent's x-coordinate {own_x}"
    return None
