"""An agent's part in secure-aggregation rounds.

After training, the agent keeps its clipped (and, with local DP, noised) delta and only
advertises fresh X25519 keys; it uploads the delta masked once the roster and the other
members' sealed shares have arrived, and finally answers the unmask request. One session
per training is held at a time; a newer task for the training replaces it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from federated_learning.bus.stream_ids import append
from federated_learning.privacy.errors import PrivacyError
from federated_learning.privacy.secure_session import AgentSecureSession
from federated_learning.protocol.messages import (
    Evaluation,
    MalformedMessage,
    SignedByAgent,
    TaskKind,
    UpdateSubmitted,
    encode,
)
from federated_learning.protocol.secure_messages import (
    MASKED_LAYER,
    SecureRoster,
    SecureSharesDelivered,
    decode_secure_inbox_message,
)
from federated_learning.protocol.tensors import encode_layers

if TYPE_CHECKING:
    from agents.client import FederatedClient, TrainedUpdate
    from federated_learning.protocol.messages import Task

log = logging.getLogger(__name__)

MASKED_BLOB_TTL_S = 24 * 3600


@dataclass
class HeldUpdate:
    """An update waiting for its session's masks, with what its notice will report."""

    session: AgentSecureSession
    received_model_version: int
    evaluation: Evaluation
    trained: TrainedUpdate


class SecureParticipation:
    """The secure sessions of one agent; sends through the agent's connection, signed."""

    def __init__(self, client: FederatedClient) -> None:
        self.client = client
        self.held: dict[str, HeldUpdate] = {}

    async def _send(self, message: SignedByAgent) -> None:
        fields = encode(self.client.signed(message))
        await append(self.client.redis, self.client.keys.update_stream, fields)

    async def hold(self, task: Task, evaluation: Evaluation, trained: TrainedUpdate,
                   delta: NDArray[np.floating]) -> None:
        """Keep the trained update for the task's session and advertise this session's keys."""
        session = AgentSecureSession(self.client.agent_id, task.training_id, task.round, task.attempt,
                                     delta, trained.num_examples, trained.unclipped)
        self.held[task.training_id] = HeldUpdate(session, task.model_version, evaluation, trained)
        await self._send(session.advertisement())

    async def handle(self, fields: dict[bytes, bytes]) -> None:
        """A roster, share delivery or unmask request; a message that does not fit is logged and skipped."""
        try:
            message = decode_secure_inbox_message(fields)
        except MalformedMessage as exc:
            log.warning("agent %s: malformed secure message skipped: %s", self.client.agent_id, exc.reason)
            return
        held = self.held.get(message.training_id)
        if held is None or not held.session.matches(message.training_id, message.round, message.attempt):
            log.info("agent %s: %s for %s/%d/%d: no such session held", self.client.agent_id, message.type,
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
            log.warning("agent %s: leaving secure session %s/%d: %s", self.client.agent_id,
                        message.training_id, message.round, exc)
            self.held.pop(message.training_id, None)

    async def _upload_masked(self, held: HeldUpdate, delivery: SecureSharesDelivered) -> None:
        masked = await asyncio.to_thread(held.session.on_delivery, delivery)
        blob = encode_layers({MASKED_LAYER: masked})
        digest = await self.client.blobs.put(blob, ttl_s=MASKED_BLOB_TTL_S, owner=self.client.agent_id)
        session, trained = held.session, held.trained
        await self._send(UpdateSubmitted(
            kind=TaskKind.TRAIN, training_id=session.training_id, round=session.round, attempt=session.attempt,
            agent_id=self.client.agent_id, received_model_version=held.received_model_version,
            evaluation=held.evaluation, update_digest=digest, num_examples=trained.num_examples,
            train_loss=trained.loss, train_accuracy=trained.accuracy, train_seconds=trained.seconds,
            upload_bytes=len(blob), dense_bytes=trained.dense_bytes))  # the clip bit is in the masked vector
        self.client.completed_tasks += 1
