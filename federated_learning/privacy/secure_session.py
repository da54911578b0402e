"""Secure aggregation between the wire messages and the protocol library.

`AgentSecureSession` is one agent's side of one round's session (it holds the update
until the masks are agreed); `unmask_weighted_mean` is the aggregator's side. What is
masked is each agent's clipped model delta scaled by ``num_examples / weight_normaliser``,
so the unmasked sum divided by the survivors' examples is FedAvg's weighted mean delta.
With adaptive clipping (``SecureSession.counts_unclipped``) each vector ends with one more
value, ``clip_range`` when the update was within the clip norm before clipping and 0 when
not, so the aggregator learns how many were, never whose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from federated_learning.privacy.errors import ProtocolViolation
from federated_learning.privacy.secure_aggregation import (
    AdvertiseKeys,
    EncryptedShareBundle,
    FixedPointCodec,
    MaskedInput,
    MaskVector,
    Roster,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    UnmaskRequest,
    UnmaskResponse,
)
from federated_learning.privacy.shamir import Share
from federated_learning.protocol.messages import SecureAggregationSpec, SecureSession
from federated_learning.protocol.secure_messages import (
    SealedShare,
    SecureKeysAdvertised,
    SecureRoster,
    SecureSharesDelivered,
    SecureSharesSubmitted,
    SecureUnmaskRequested,
    SecureUnmaskShares,
    ShareValue,
)

INT32_MAX = 2**31 - 1


def fixed_point_scale(num_members: int, clip_range: float) -> float:
    """The largest power of two whose codes of ``num_members`` values in [-clip_range, clip_range]
    sum without wrapping modulo 2**32 (finer codes: less rounding error)."""
    if num_members < 1 or not (clip_range > 0 and math.isfinite(clip_range)):
        raise ValueError(f"need num_members >= 1 and a finite clip range > 0; got {num_members}, {clip_range}")
    exponent = math.floor(math.log2(INT32_MAX / (num_members * clip_range)))
    scale = 2.0**exponent
    while num_members * round(clip_range * scale) > INT32_MAX:
        scale /= 2.0
    return scale


def session_threshold(num_members: int, fraction: float) -> int:
    """Shares needed to rebuild a secret: floor(fraction * n) + 1, at least 2 and at most n."""
    return max(2, min(num_members, math.floor(fraction * num_members) + 1))


def library_config(session: SecureSession) -> SecAggConfig:
    return SecAggConfig(bytes.fromhex(session.session_id), session.threshold, session.vector_length,
                        FixedPointCodec(session.scale, session.clip_range))


def library_roster(session: SecureSession) -> Roster:
    return Roster(library_config(session), tuple(
        AdvertiseKeys(m.agent_id, bytes.fromhex(m.cipher_public_key), bytes.fromhex(m.mask_public_key))
        for m in session.members))


def _share_value(share: Share) -> ShareValue:
    return ShareValue(x=share.x, y=format(share.y, "x"))


def _share(value: ShareValue) -> Share:
    return Share(value.x, int(value.y, 16))


class AgentSecureSession:
    """One agent's side of one secure round: keys, sealed shares, the masked update, unmasking."""

    def __init__(self, agent_id: str, training_id: str, round_number: int, attempt: int,
                 delta: NDArray[np.floating], num_examples: int, unclipped: bool | None = None) -> None:
        """unclipped: whether the update's norm was within the clip norm before clipping; a
        session that counts unclipped updates needs it."""
        self.agent_id = agent_id
        self.training_id = training_id
        self.round = round_number
        self.attempt = attempt
        self.delta = np.asarray(delta, dtype=np.float64).ravel()
        self.num_examples = num_examples
        self.unclipped = unclipped
        self._client = SecAggClient.generate(agent_id)
        self._session: SecureSession | None = None

    def matches(self, training_id: str, round_number: int, attempt: int) -> bool:
        return (training_id, round_number, attempt) == (self.training_id, self.round, self.attempt)

    def advertisement(self) -> SecureKeysAdvertised:
        keys = self._client.advertise()
        return SecureKeysAdvertised(
            training_id=self.training_id, round=self.round, attempt=self.attempt, agent_id=self.agent_id,
            cipher_public_key=keys.cipher_public_key.hex(), mask_public_key=keys.mask_public_key.hex(),
            num_examples=self.num_examples)

    def on_roster(self, roster: SecureRoster) -> SecureSharesSubmitted:
        """Check the roster carries this agent's keys and update size; seal one share per member."""
        session = roster.session
        own = next((m for m in session.members if m.agent_id == self.agent_id), None)
        mine = self.advertisement()
        if own is None or (own.cipher_public_key, own.mask_public_key, own.num_examples) != (
                mine.cipher_public_key, mine.mask_public_key, self.num_examples):
            raise ProtocolViolation(f"roster does not carry agent '{self.agent_id}' as it advertised")
        if session.vector_length != self.delta.size + session.counts_unclipped:
            raise ProtocolViolation(f"roster expects {session.vector_length} values; the update has "
                                    f"{self.delta.size}" + (" plus the clip bit" if session.counts_unclipped else ""))
        if session.counts_unclipped and self.unclipped is None:
            raise ProtocolViolation("roster counts unclipped updates but this update was not clipped")
        self._session = session
        sealed = self._client.seal_shares(self._client.share_keys(library_roster(session)))
        return SecureSharesSubmitted(
            training_id=self.training_id, round=self.round, attempt=self.attempt, agent_id=self.agent_id,
            shares=[SealedShare(sender=s.sender, recipient=s.recipient, nonce=s.nonce.hex(),
                                ciphertext=s.ciphertext.hex()) for s in sealed])

    def on_delivery(self, delivery: SecureSharesDelivered) -> MaskVector:
        """Open the shares the other members sent; return the masked, weighted update."""
        session = self._require_session()
        sealed = [EncryptedShareBundle(s.sender, s.recipient, bytes.fromhex(s.nonce), bytes.fromhex(s.ciphertext))
                  for s in delivery.shares]
        self._client.receive_shares(self._client.open_shares(sealed))
        weighted = self.delta * (self.num_examples / session.weight_normaliser)
        if session.counts_unclipped:
            weighted = np.append(weighted, session.clip_range if self.unclipped else 0.0)
        return self._client.mask(weighted).vector

    def on_unmask(self, request: SecureUnmaskRequested) -> SecureUnmaskShares:
        response = self._client.unmask(UnmaskRequest(tuple(request.survivors), tuple(request.dropped)))
        return SecureUnmaskShares(
            training_id=self.training_id, round=self.round, attempt=self.attempt, agent_id=self.agent_id,
            mask_key_shares={a: _share_value(s) for a, s in response.mask_key_shares.items()},
            self_seed_shares={a: _share_value(s) for a, s in response.self_seed_shares.items()})

    def _require_session(self) -> SecureSession:
        if self._session is None:
            raise ProtocolViolation(f"agent '{self.agent_id}' has no roster for this round")
        return self._session


@dataclass(frozen=True)
class UnmaskedRound:
    mean: NDArray[np.float64]
    """The survivors' example-weighted mean delta (the model's values only)."""
    unclipped_count: int | None
    """How many survivors' updates were within the clip norm; None unless the session counts them."""


def unmask_weighted_mean(spec: SecureAggregationSpec, masked: Mapping[str, MaskVector],
                         responses: Sequence[SecureUnmaskShares]) -> UnmaskedRound:
    """The survivors' example-weighted mean delta (and count of unclipped updates), from their
    masked uploads and t unmask responses.

    Raises:
        InsufficientSurvivors: fewer than the threshold of responses or uploads.
        ProtocolViolation: shares that rebuild no key, or an upload from outside the session.
    """
    session = spec.session
    server = SecAggServer.resume(library_roster(session), spec.share_senders)
    for agent_id in sorted(masked):
        server.submit_masked(MaskedInput(agent_id, masked[agent_id]))
    total = server.aggregate([
        UnmaskResponse(r.agent_id, {a: _share(v) for a, v in r.mask_key_shares.items()},
                       {a: _share(v) for a, v in r.self_seed_shares.items()})
        for r in responses])
    unclipped_count = None
    if session.counts_unclipped:
        total, unclipped_count = total[:-1], decode_unclipped_count(float(total[-1]), session, len(masked))
    examples = {m.agent_id: m.num_examples for m in session.members}
    survivors_examples = sum(examples[agent_id] for agent_id in masked)
    mean: NDArray[np.float64] = total * (session.weight_normaliser / survivors_examples)
    _check_mean_norm(mean, session, len(masked), survivors_examples)
    return UnmaskedRound(mean, unclipped_count)


def decode_unclipped_count(decoded_sum: float, session: SecureSession, survivors: int) -> int:
    """The number of survivors that sent clip_range (not 0) as their last value. A member that
    sends something else can move the count by at most one, as by lying about its bit, so the
    count is rounded and kept in [0, survivors] rather than failing the round."""
    one = round(session.clip_range * session.scale) / session.scale  # what clip_range decodes to
    return min(max(round(decoded_sum / one), 0), survivors)


def _check_mean_norm(mean: NDArray[np.float64], session: SecureSession, survivors: int,
                     survivors_examples: int) -> None:
    """A weighted mean of deltas clipped to C has norm <= C, plus the fixed-point rounding; a
    wrong share (nothing commits to the self-mask seeds) leaves a mask in and breaks this by
    orders of magnitude. Raises ProtocolViolation so the round is redone, not released. (An
    agent that skips clipping trips it too: either way a member broke the protocol.)"""
    rounding = survivors / (2 * session.scale) * session.weight_normaliser / survivors_examples
    bound = session.clip_range * (1 + 1e-6) + math.sqrt(mean.size) * rounding
    norm = float(np.linalg.norm(mean))
    if not norm <= bound:
        raise ProtocolViolation(f"unmasked mean has L2 norm {norm:.4g} > {bound:.4g}, the most clipped "
                                "updates allow: a member sent wrong unmask shares (or an update it did not clip)")
