"""An agent's part in secure-aggregation rounds.

After training, the agent keeps its clipped (and, with local DP, noised) delta and only
advertises fresh X25519 keys; it uploads the delta masked once the roster and the other
members' sealed shares have arrived, and finally answers the unmask request. One session
per training is held at a time; a newer task for the training replaces it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from agents.updates import TrainedUpdate
from federated_learning.privacy.errors import PrivacyError
from federated_learning.privacy.secure_session import AgentSecureSession
from federated_learning.protocol.messages import (
    Evaluation,
    MalformedMessage,
    SignedByAgent,
    Task,
    TaskKind,
    UpdateSubmitted,
)
from federated_learning.protocol.secure_messages import (
    MASKED_LAYER,
    SecureRoster,
    SecureSharesDelivered,
    decode_secure_inbox_message,
)
from federated_learning.protocol.tensors import encode_layers
from federated_learning.types import BlobDigest

log = logging.getLogger(__name__)


@dataclass
class HeldUpdate:
    """An update waiting for its session's masks, with what its notice will report."""

    session: AgentSecureSession
    received_model_version: int
    evaluation: Evaluation
    trained: TrainedUpdate


class SecureParticipation:
    """The secure sessions of one agent.

    Args:
        send: signs a message and appends it to the update stream.
        upload: stores a blob as the agent's upload and returns its digest.
        on_submitted: called once the masked update's notice is sent (the task is done).
    """

    def __init__(
        self,
        agent_id: str,
        *,
        send: Callable[[SignedByAgent], Awaitable[None]],
        upload: Callable[[bytes], Awaitable[BlobDigest]],
        on_submitted: Callable[[], None],
    ) -> None:
        self.agent_id = agent_id
        self._send = send
        self._upload = upload
        self._on_submitted = on_submitted
        self.held: dict[str, HeldUpdate] = {}

    async def hold(self, task: Task, evaluation: Evaluation, trained: TrainedUpdate,
                   delta: NDArray[np.floating]) -> None:
        """Keep the trained update for the task's session and advertise this session's keys."""
        session = AgentSecureSession(self.agent_id, task.training_id, task.round, task.attempt,
                                     delta, trained.num_examples, trained.unclipped)
        self.held[task.training_id] = HeldUpdate(session, task.model_version, evaluation, trained)
        await self._send(session.advertisement())

    async def handle(self, fields: dict[bytes, bytes]) -> None:
        """A roster, share delivery or unmask request; a message that does not fit is logged and skipped."""
        try:
            message = decode_secure_inbox_message(fields)
        except MalformedMessage as exc:
            log.warning("agent %s: malformed secure message skipped: %s", self.agent_id, exc.reason)
            return
        held = self.held.get(message.training_id)
        if held is None or not held.session.matches(message.training_id, message.round, message.attempt):
            log.info("agent %s: %s for %s/%d/%d: no such session held", self.agent_id, message.type,
                     message.training_id, message.round, message.attempt)
            return
        try:
            if isinstance(message, SecureRoster):
                await self._send(held.session.on_roster(message))
            elif isinstance(message, SecureSharesDelivered):
                await self._upload_masked(held, message)
            else:
                await self._send(held.session.on_unmask(message))
                del self.held[message.training_id]
        except PrivacyError as exc:
            log.warning("agent %s: leaving secure session %s/%d: %s", self.agent_id,
                        message.training_id, message.round, exc)
            self.held.pop(message.training_id, None)

    async def _upload_masked(self, held: HeldUpdate, delivery: SecureSharesDelivered) -> None:
        masked = await asyncio.to_thread(held.session.on_delivery, delivery)
        blob = encode_layers({MASKED_LAYER: masked})
        digest = await self._upload(blob)
        session, trained = held.session, held.trained
        await self._send(UpdateSubmitted(
            kind=TaskKind.TRAIN, training_id=session.training_id, round=session.round, attempt=session.attempt,
            agent_id=self.agent_id, received_model_version=held.received_model_version,
            evaluation=held.evaluation, update_digest=digest, num_examples=trained.num_examples,
            train_loss=trained.loss, train_accuracy=trained.accuracy, train_seconds=trained.seconds,
            upload_bytes=len(blob), dense_bytes=trained.dense_bytes))  # the clip bit is in the masked vector
        self._on_submitted()
