"""Messages of the secure-aggregation exchange (Bonawitz et al. 2017) inside one round.

Agents send theirs on the update stream (signed like update notices); the coordinator
answers in the agents' inboxes. One exchange belongs to (training, round, attempt):
a retry starts a new session with new keys.

    agent -> coordinator   SecureKeysAdvertised    after local training
    coordinator -> agent   SecureRoster            the members, their keys, the session
    agent -> coordinator   SecureSharesSubmitted   sealed Shamir shares, one per member
    coordinator -> agent   SecureSharesDelivered   the shares addressed to this agent
    agent -> coordinator   UpdateSubmitted         the masked update (a uint32 blob)
    coordinator -> agent   SecureUnmaskRequested   who uploaded and who dropped out
    agent -> coordinator   SecureUnmaskShares      shares that remove the masks
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from federated_learning.protocol.messages import (
    MAX_MEMBERS,
    PAYLOAD_FIELD,
    Identifier,
    MalformedMessage,
    Message,
    PublicKeyHex,
    SecureSession,
    SignedByAgent,
)

MAX_SEALED_SHARE_HEX = 1024
MASKED_LAYER = "masked"
"""A masked update is a safetensors blob with this one uint32 tensor (the flattened model)."""
MASKED_DTYPES = frozenset({"uint32"})


class _Round(Message):
    training_id: Identifier
    round: int = Field(ge=1)
    attempt: int = Field(ge=1)


class _SignedByAgent(_Round, SignedByAgent):
    agent_id: Identifier


class SecureKeysAdvertised(_SignedByAgent):
    type: Literal["secure_keys"] = "secure_keys"
    cipher_public_key: PublicKeyHex
    mask_public_key: PublicKeyHex
    num_examples: int = Field(gt=0, description="examples behind the update the agent holds")


class SecureRoster(_Round):
    type: Literal["secure_roster"] = "secure_roster"
    session: SecureSession


class SealedShare(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sender: Identifier
    recipient: Identifier
    nonce: str = Field(pattern=r"^[0-9a-f]{24}$")
    ciphertext: str = Field(pattern=r"^[0-9a-f]+$", max_length=MAX_SEALED_SHARE_HEX)


class SecureSharesSubmitted(_SignedByAgent):
    type: Literal["secure_shares"] = "secure_shares"
    shares: list[SealedShare] = Field(max_length=MAX_MEMBERS)


class SecureSharesDelivered(_Round):
    type: Literal["secure_delivery"] = "secure_delivery"
    shares: list[SealedShare] = Field(max_length=MAX_MEMBERS)


class SecureUnmaskRequested(_Round):
    type: Literal["secure_unmask"] = "secure_unmask"
    survivors: list[Identifier] = Field(max_length=MAX_MEMBERS)
    dropped: list[Identifier] = Field(max_length=MAX_MEMBERS)


class ShareValue(BaseModel):
    """One Shamir share (x, y) with y as hex (it exceeds JSON's safe integers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    x: int = Field(ge=1, le=MAX_MEMBERS)
    y: str = Field(pattern=r"^[0-9a-f]{1,160}$")


class SecureUnmaskShares(_SignedByAgent):
    type: Literal["secure_unmask_shares"] = "secure_unmask_shares"
    mask_key_shares: dict[Identifier, ShareValue] = Field(
        default_factory=dict, description="shares of the dropped agents' mask keys")
    self_seed_shares: dict[Identifier, ShareValue] = Field(
        default_factory=dict, description="shares of the survivors' self-mask seeds")


SecureAgentMessage: TypeAlias = Annotated[
    SecureKeysAdvertised | SecureSharesSubmitted | SecureUnmaskShares, Field(discriminator="type")]
SecureInboxMessage: TypeAlias = Annotated[
    SecureRoster | SecureSharesDelivered | SecureUnmaskRequested, Field(discriminator="type")]
SECURE_AGENT_TYPES = frozenset({"secure_keys", "secure_shares", "secure_unmask_shares"})
SECURE_INBOX_TYPES = frozenset({"secure_roster", "secure_delivery", "secure_unmask"})

_agent_messages: TypeAdapter[SecureAgentMessage] = TypeAdapter(SecureAgentMessage)
_inbox_messages: TypeAdapter[SecureInboxMessage] = TypeAdapter(SecureInboxMessage)


def message_type(fields: dict[bytes, bytes]) -> str | None:
    """The ``type`` of a stream entry's message without validating it (None if unreadable)."""
    try:
        payload = json.loads(fields.get(PAYLOAD_FIELD, b""))
    except ValueError:
        return None
    kind = payload.get("type") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


def decode_secure_agent_message(fields: dict[bytes, bytes]) -> SecureAgentMessage:
    try:
        return _agent_messages.validate_json(fields.get(PAYLOAD_FIELD, b""))
    except ValueError as exc:
        raise MalformedMessage(str(exc).replace("\n", " ")[:500]) from exc


def decode_secure_inbox_message(fields: dict[bytes, bytes]) -> SecureInboxMessage:
    try:
        return _inbox_messages.validate_json(fields.get(PAYLOAD_FIELD, b""))
    except ValueError as exc:
        raise MalformedMessage(str(exc).replace("\n", " ")[:500]) from exc
