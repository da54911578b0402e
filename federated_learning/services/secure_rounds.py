"""Secure-aggregation rounds inside the coordinator (the transport of Bonawitz et al. 2017).

The coordinator relays keys and sealed shares between the round's agents and tells the
aggregator which masked uploads and unmask shares make up the round; it never sees an
agent's update in the clear, and neither does the aggregator, which learns only the
weighted mean. Every message is stored per (training, round, attempt) before it counts,
so a restarted coordinator resumes the exchange where it stood; a retry starts a new
session. The phase logic is in :mod:`federated_learning.coordination.secure`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pydantic import BaseModel

from federated_learning.bus.blobs import BlobMissing
from federated_learning.bus.replies import text
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
    MalformedMessage,
    SecureAggregationSpec,
    Severity,
    TrainingStatus,
    UpdateSubmitted,
    encode,
)
from federated_learning.protocol.secure_messages import (
    MASKED_DTYPES,
    MASKED_LAYER,
    SecureAgentMessage,
    SecureKeysAdvertised,
    SecureRoster,
    SecureSharesDelivered,
    SecureSharesSubmitted,
    SecureUnmaskRequested,
    SecureUnmaskShares,
    decode_secure_agent_message,
)
from federated_learning.protocol.tensors import InvalidTensor, decode_layers, is_float

if TYPE_CHECKING:
    from federated_learning.services.coordinator import Coordinator
    from federated_learning.services.rounds import UpdateContext

M = TypeVar("M", bound=BaseModel)

INBOX_MAXLEN = 1000
EXCHANGE_TTL_S = 24 * 3600

_PHASE_OF = {"secure_keys": SecurePhase.KEYS, "secure_shares": SecurePhase.SHARES,
             "secure_unmask_shares": SecurePhase.UNMASK}
_PART_OF = {SecurePhase.KEYS: "keys", SecurePhase.SHARES: "shares", SecurePhase.UNMASK: "unmask"}


def vector_length(state: TrainingState) -> int:
    """Values in a masked update: the float layers' (integer layers are not masked; they keep
    the global model's values in secure trainings)."""
    return sum(int(np.prod(shape)) for shape, dtype in state.layer_spec.values() if is_float(dtype))


class SecureRounds:
    """The secure exchange of synchronous rounds; shares the coordinator's store and context."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def _key_owners(self, state: TrainingState) -> str:
        """Hash public key -> the agent that advertised it in this session (repeats are refused
        in O(1), not by reading every advertisement)."""
        assert state.secure is not None
        return self.c.keys.secure_exchange(state.training_id, state.round, state.secure.attempt, "key_owners")

    def _part(self, state: TrainingState, phase: SecurePhase) -> str:
        assert state.secure is not None
        return self.c.keys.secure_exchange(state.training_id, state.round, state.secure.attempt, _PART_OF[phase])

    # -- agents' messages --------------------------------------------------------

    async def on_message(self, fields: dict[bytes, bytes]) -> None:
        try:
            message = decode_secure_agent_message(fields)
        except MalformedMessage as exc:
            await self.c.ctx.reject("updates", "malformed", exc.reason)
            return
        context: UpdateContext = {"training_id": message.training_id, "round": message.round,
                                  "agent_id": message.agent_id}
        sender = await self.c.check_sender(message, context)
        if sender is None:
            return
        state, _agent = sender
        if self._late_unmask(state, message):
            return  # the round went on with the threshold of shares; later ones are not needed
        problem = self._stale(state, message)
        if problem is None:
            problem = await self._check(state, message)
        if problem is not None:
            await self.c.ctx.reject("updates", problem[0], problem[1], **context)
            return
        assert state.secure is not None
        part = self._part(state, state.secure.phase)
        async with self.c.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(part, message.agent_id, message.model_dump_json())  # redelivery counts once
            pipe.expire(part, EXCHANGE_TTL_S)
            if isinstance(message, SecureKeysAdvertised):
                owners = self._key_owners(state)
                pipe.hsetnx(owners, message.cipher_public_key, message.agent_id)
                pipe.hsetnx(owners, message.mask_public_key, message.agent_id)
                pipe.expire(owners, EXCHANGE_TTL_S)
            await pipe.execute()
        await self.advance(state)

    @staticmethod
    def _late_unmask(state: TrainingState, message: SecureAgentMessage) -> bool:
        secure = state.secure
        return (isinstance(message, SecureUnmaskShares) and secure is not None
                and secure.phase is SecurePhase.UNMASK and state.phase is not RoundPhase.COLLECTING
                and (message.round, message.attempt) == (state.round, secure.attempt))

    @staticmethod
    def _stale(state: TrainingState, message: SecureAgentMessage) -> tuple[str, str] | None:
        secure = state.secure
        if (not state.config.secure_aggregation or secure is None or state.phase is not RoundPhase.COLLECTING
                or (message.round, message.attempt) != (state.round, secure.attempt)
                or _PHASE_OF[message.type] is not secure.phase):
            where = f"round {state.round}" + (f" attempt {secure.attempt}" if secure else "") + (
                f", secure phase {secure.phase.value}" if secure else "")
            return ("stale_round", (f"{message.type} for round {message.round} attempt {message.attempt}; "
                                   f"training is in {where}"))
        return None

    async def _check(self, state: TrainingState, message: SecureAgentMessage) -> tuple[str, str] | None:
        secure = state.secure
        assert secure is not None
        detail: str | None
        if isinstance(message, SecureKeysAdvertised):
            keys = [message.cipher_public_key, message.mask_public_key]
            owners = await self.c.redis.hmget(self._key_owners(state), keys)
            detail = check_keys(message, state.selected,
                                {k: None if o is None else text(o) for k, o in zip(keys, owners, strict=True)})
        elif isinstance(message, SecureSharesSubmitted):
            assert secure.session is not None
            detail = check_shares(message, secure.session)
        else:
            assert secure.session is not None
            detail = check_unmask(message, secure.session, secure.share_senders, secure.survivors)
        return None if detail is None else ("bad_secure_message", detail)

    async def _stored(self, state: TrainingState, phase: SecurePhase, model: type[M]) -> list[M]:
        raw = await self.c.redis.hvals(self._part(state, phase))
        return sorted((model.model_validate_json(v) for v in raw), key=lambda m: getattr(m, "agent_id", ""))

    async def check_upload(self, state: TrainingState, notice: UpdateSubmitted) -> tuple[str, str] | None:
        """Why a masked upload is refused (wrong phase, not a share sender, bad blob), or None."""
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
        assert notice.update_digest is not None
        try:
            layers = decode_layers(await self.c.ctx.blobs.get(notice.update_digest, owner=notice.agent_id),
                                   max_bytes=self.c.settings.max_blob_bytes, allowed_dtypes=MASKED_DTYPES)
        except BlobMissing:
            return "blob_missing", f"no blob {notice.update_digest}"
        except InvalidTensor as exc:
            return exc.reason, exc.detail
        shape = [tuple(layer.shape) for layer in layers.values()]
        if list(layers) != [MASKED_LAYER] or shape != [(secure.session.vector_length,)]:
            return "bad_shape", (f"a masked update is one uint32 tensor '{MASKED_LAYER}' of "
                                 f"{secure.session.vector_length} values; got {dict(zip(layers, shape))}")
        return None

    # -- phases ------------------------------------------------------------------

    async def advance(self, state: TrainingState) -> None:
        """Move the collecting round's exchange on when its phase has what it needs."""
        secure = state.secure
        if secure is None or state.phase is not RoundPhase.COLLECTING:
            return
        decision, arrived = await self._decide(state, secure)
        if decision is RoundDecision.WAIT:
            return
        if decision is RoundDecision.RETRY:
            await self.restart(state, f"secure phase {secure.phase.value}: {arrived} answers by the deadline")
        elif decision is RoundDecision.FAIL:
            await self.c.finish(state, TrainingStatus.FAILED,
                                f"round {state.round}: secure phase {secure.phase.value} had {arrived} "
                                f"answers after {state.retries + 1} attempts; needs {self._needed(state)}")
        elif secure.phase is SecurePhase.KEYS:
            await self._publish_roster(state, secure)
        elif secure.phase is SecurePhase.SHARES:
            await self._deliver_shares(state, secure)
        elif secure.phase is SecurePhase.MASKED:
            await self._request_unmasking(state, secure)
        else:
            await self.c.close_round(state)

    def _needed(self, state: TrainingState) -> int:
        assert state.secure is not None
        return max(state.secure.threshold, state.min_clients, MIN_SECURE_CLIENTS)

    async def _decide(self, state: TrainingState, secure: SecureRoundState) -> tuple[RoundDecision, int]:
        now = time.time()
        common: dict[str, Any] = {"now": now, "deadline_at": state.deadline_at, "attempt": state.retries + 1,
                                  "max_attempts": state.config.max_round_attempts}
        if secure.phase is SecurePhase.KEYS:
            arrived = await self.c.redis.hlen(self._part(state, SecurePhase.KEYS))
            return decide_round(accepted=arrived, responded=arrived, selected=len(state.selected),
                                target=state.clients_per_round,
                                min_clients=max(state.min_clients, MIN_SECURE_CLIENTS), **common), arrived
        if secure.phase is SecurePhase.MASKED:
            arrived = await self.c.redis.hlen(self.c.keys.round_updates(state.training_id, state.round))
            expected = len(secure.share_senders)
        else:
            arrived = await self.c.redis.hlen(self._part(state, secure.phase))
            expected = len(secure.members) if secure.phase is SecurePhase.SHARES else len(secure.survivors)
        needed = secure.threshold if secure.phase is SecurePhase.UNMASK else self._needed(state)
        return decide_phase(arrived=arrived, expected=expected, needed=needed,
                            early_at_needed=secure.phase is SecurePhase.UNMASK, **common), arrived

    def _next_phase(self, state: TrainingState, secure: SecureRoundState, phase: SecurePhase) -> None:
        secure.phase = phase
        state.deadline_at = time.time() + min(SECURE_PHASE_TIMEOUT_S, state.round_deadline_s)

    async def _send(self, state: TrainingState, messages: dict[str, BaseModel]) -> None:
        async with self.c.redis.pipeline(transaction=True) as pipe:
            for agent_id, message in messages.items():
                pipe.xadd(self.c.keys.inbox_stream(agent_id), encode(message),
                          maxlen=INBOX_MAXLEN, approximate=True)
            self.c.store.stage_save(pipe, state)
            await pipe.execute()

    async def _publish_roster(self, state: TrainingState, secure: SecureRoundState) -> None:
        advertised = await self._stored(state, SecurePhase.KEYS, SecureKeysAdvertised)
        assert state.clip_norm is not None
        secure.session = build_session(advertised, threshold_fraction=state.config.secure_threshold,
                                       vector_length=vector_length(state), clip_range=state.clip_norm,
                                       counts_unclipped=state.config.adaptive_clipping is not None)
        self._next_phase(state, secure, SecurePhase.SHARES)
        roster = SecureRoster(training_id=state.training_id, round=state.round, attempt=secure.attempt,
                              session=secure.session)
        await self._send(state, dict.fromkeys(secure.members, roster))
        await self.c.ctx.emit("secure_roster", f"round {state.round}: {len(secure.members)} agents in the secure "
                              f"session, threshold {secure.threshold}", training_id=state.training_id,
                              round=state.round, members=len(secure.members), threshold=secure.threshold)

    async def _deliver_shares(self, state: TrainingState, secure: SecureRoundState) -> None:
        submissions = await self._stored(state, SecurePhase.SHARES, SecureSharesSubmitted)
        secure.share_senders = sorted(s.agent_id for s in submissions)
        self._next_phase(state, secure, SecurePhase.MASKED)
        base = {"training_id": state.training_id, "round": state.round, "attempt": secure.attempt}
        await self._send(state, {recipient: SecureSharesDelivered(shares=shares, **base)  # type: ignore[arg-type]
                                 for recipient, shares in deliveries(submissions).items()})

    async def _request_unmasking(self, state: TrainingState, secure: SecureRoundState) -> None:
        uploaded = await self.c.redis.hkeys(self.c.keys.round_updates(state.training_id, state.round))
        secure.survivors = sorted(text(u) for u in uploaded)
        dropped = sorted(set(secure.share_senders) - set(secure.survivors))
        self._next_phase(state, secure, SecurePhase.UNMASK)
        request = SecureUnmaskRequested(training_id=state.training_id, round=state.round, attempt=secure.attempt,
                                        survivors=secure.survivors, dropped=dropped)
        await self._send(state, dict.fromkeys(secure.survivors, request))
        if dropped:
            await self.c.ctx.emit("secure_dropouts", f"round {state.round}: {len(dropped)} agents dropped out "
                                  "after sharing keys; their masks are removed from the survivors' shares",
                                  severity=Severity.WARNING, training_id=state.training_id, round=state.round,
                                  dropped=dropped)

    async def job_spec(self, state: TrainingState) -> SecureAggregationSpec:
        """What the aggregator needs to remove the masks of the round being closed."""
        secure = state.secure
        assert secure is not None and secure.session is not None
        responses = await self._stored(state, SecurePhase.UNMASK, SecureUnmaskShares)
        return SecureAggregationSpec(session=secure.session, attempt=secure.attempt,
                                     share_senders=secure.share_senders,
                                     responders=[r.agent_id for r in responses])

    async def restart(self, state: TrainingState, why: str) -> None:
        """Abandon the session: masked uploads of a failed session are useless. Select anew."""
        state.retries += 1
        state.secure = None
        state.selected, state.responded = [], []
        # One transaction: a crash after it leaves a round without a session, which the
        # tick retries; never a session whose uploads are gone.
        async with self.c.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.c.keys.round_updates(state.training_id, state.round))
            self.c.store.stage_save(pipe, state)
            await pipe.execute()
        await self.c.ctx.emit("secure_round_restarted", f"round {state.round}: {why}; new session",
                              severity=Severity.WARNING, training_id=state.training_id, round=state.round)
        await self.c.open_round(state, state.round, retry=True)
