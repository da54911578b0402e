"""Ed25519 signatures on update notices, over a canonical JSON form.

An agent signs each notice it publishes (round, agent, base version, ...) together with
the SHA-256 of the update blob it refers to, so the server can check that the blob it
fetched is the one the agent meant and that the notice came from that agent. The bytes
signed are `canonical_notice_bytes`: JSON with sorted keys, no whitespace, UTF-8, no NaN,
so signer and verifier agree byte for byte whatever dict order they hold.
Ed25519: Bernstein et al., "High-speed high-security signatures", 2012; RFC 8032.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from federated_learning.privacy.errors import InvalidSignature
from federated_learning.secret_files import write_secret

PRIVATE_KEY_FILE = "agent_ed25519.pem"
PUBLIC_KEY_FILE = "agent_ed25519.pub.pem"
BLOB_DIGEST_FIELD = "blob_sha256"


def canonical_notice_bytes(fields: Mapping[str, Any]) -> bytes:
    """Canonical JSON of the fields: sorted keys, separators ',' and ':', UTF-8, no NaN."""
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def blob_digest(blob: bytes) -> str:
    """Hex SHA-256 of an update blob, the value signed under BLOB_DIGEST_FIELD."""
    return hashlib.sha256(blob).hexdigest()


def _with_digest(fields: Mapping[str, Any], blob: bytes) -> dict[str, Any] | None:
    """Fields plus the blob digest; None when fields carry a different digest."""
    digest = blob_digest(blob)
    if fields.get(BLOB_DIGEST_FIELD, digest) != digest:
        return None
    return {**fields, BLOB_DIGEST_FIELD: digest}


class AgentKeyPair:
    """An agent's Ed25519 signing key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key

    @classmethod
    def generate(cls) -> AgentKeyPair:
        """A fresh key from the OS CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key_bytes(self) -> bytes:
        """The 32-byte raw public key, to register with the coordinator."""
        return self._private_key.public_key().public_bytes_raw()

    def sign(self, payload: bytes) -> bytes:
        """64-byte Ed25519 signature of payload."""
        return self._private_key.sign(payload)

    def sign_notice(self, fields: Mapping[str, Any], blob: bytes) -> bytes:
        """Sign the canonical form of fields plus the blob's SHA-256 (BLOB_DIGEST_FIELD)."""
        signed = _with_digest(fields, blob)
        if signed is None:
            raise ValueError(f"notice field '{BLOB_DIGEST_FIELD}' does not match the blob")
        return self.sign(canonical_notice_bytes(signed))

    def save(self, state_dir: Path | str) -> Path:
        """Write the private key (PKCS8 PEM, mode 0600) and public key into state_dir."""
        folder = Path(state_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / PRIVATE_KEY_FILE
        pem = self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_secret(path, pem.decode("ascii"))
        (folder / PUBLIC_KEY_FILE).write_bytes(self._private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return path

    @classmethod
    def load(cls, state_dir: Path | str) -> AgentKeyPair:
        """Read the private key written by `save`."""
        path = Path(state_dir) / PRIVATE_KEY_FILE
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_generate(cls, state_dir: Path | str) -> AgentKeyPair:
        """The saved key if state_dir has one, else a new key saved there."""
        if (Path(state_dir) / PRIVATE_KEY_FILE).exists():
            return cls.load(state_dir)
        pair = cls.generate()
        pair.save(state_dir)
        return pair


def verify(public_key_bytes: bytes, payload: bytes, signature: bytes) -> bool:
    """Whether signature is a valid Ed25519 signature of payload; False on any malformed input."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key_bytes).verify(signature, payload)
    except (_CryptoInvalidSignature, ValueError, TypeError):
        return False
    return True


def verify_notice(
    public_key_bytes: bytes, fields: Mapping[str, Any], blob: bytes, signature: bytes
) -> bool:
    """Whether signature covers these notice fields and this exact blob."""
    signed = _with_digest(fields, blob)
    if signed is None:
        return False
    try:
        payload = canonical_notice_bytes(signed)
    except (TypeError, ValueError):
        return False
    return verify(public_key_bytes, payload, signature)


def require_valid_notice(
    agent_id: str, public_key_bytes: bytes, fields: Mapping[str, Any], blob: bytes,
    signature: bytes,
) -> None:
    """Raise InvalidSignature(agent_id) unless `verify_notice` holds."""
    if not verify_notice(public_key_bytes, fields, blob, signature):
        raise InvalidSignature(agent_id)
