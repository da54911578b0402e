"""Ed25519 notice signing over canonical JSON."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from federated_learning.privacy.errors import InvalidSignature
from federated_learning.privacy.signing import (
    PRIVATE_KEY_FILE,
    AgentKeyPair,
    blob_digest,
    canonical_notice_bytes,
    require_valid_notice,
    verify,
    verify_notice,
)

NOTICE = {"round": 3, "agent_id": "agent-07", "base_version": 12, "num_examples": 640}
BLOB = b"\x00\x01safetensors bytes"


def test_signature_round_trips() -> None:
    pair = AgentKeyPair.generate()

    signature = pair.sign(b"payload")

    assert len(signature) == 64
    assert verify(pair.public_key_bytes, b"payload", signature)


def test_tampered_payload_signature_or_key_is_rejected() -> None:
    pair = AgentKeyPair.generate()
    signature = pair.sign(b"payload")

    assert not verify(pair.public_key_bytes, b"payload!", signature)
    assert not verify(pair.public_key_bytes, b"payload", bytes([signature[0] ^ 1]) + signature[1:])
    assert not verify(AgentKeyPair.generate().public_key_bytes, b"payload", signature)


def test_malformed_inputs_verify_false_without_raising() -> None:
    pair = AgentKeyPair.generate()

    assert not verify(b"short", b"payload", pair.sign(b"payload"))
    assert not verify(pair.public_key_bytes, b"payload", b"not a signature")


def test_canonical_bytes_sort_keys_drop_whitespace_and_keep_utf8() -> None:
    assert canonical_notice_bytes({"b": 1, "a": [1, 2], "é": "ü"}) == \
        '{"a":[1,2],"b":1,"é":"ü"}'.encode()
    assert canonical_notice_bytes({"x": 1, "y": 2}) == canonical_notice_bytes({"y": 2, "x": 1})
    with pytest.raises(ValueError):
        canonical_notice_bytes({"x": float("nan")})


def test_notice_signature_covers_fields_and_blob() -> None:
    pair = AgentKeyPair.generate()

    signature = pair.sign_notice(NOTICE, BLOB)

    assert verify_notice(pair.public_key_bytes, dict(reversed(NOTICE.items())), BLOB, signature)
    assert not verify_notice(pair.public_key_bytes, {**NOTICE, "round": 4}, BLOB, signature)
    assert not verify_notice(pair.public_key_bytes, NOTICE, BLOB + b"x", signature)
    assert verify_notice(pair.public_key_bytes, {**NOTICE, "blob_sha256": blob_digest(BLOB)},
                         BLOB, signature)
    assert not verify_notice(pair.public_key_bytes, {**NOTICE, "blob_sha256": "0" * 64},
                             BLOB, signature)


def test_require_valid_notice_names_the_agent() -> None:
    pair = AgentKeyPair.generate()
    signature = pair.sign_notice(NOTICE, BLOB)
    require_valid_notice("agent-07", pair.public_key_bytes, NOTICE, BLOB, signature)

    with pytest.raises(InvalidSignature, match="agent 'agent-07'"):
        require_valid_notice("agent-07", pair.public_key_bytes, NOTICE, b"other", signature)


def test_key_saves_with_mode_0600_and_loads_back(tmp_path: Path) -> None:
    pair = AgentKeyPair.generate()

    path = pair.save(tmp_path / "state")
    loaded = AgentKeyPair.load(tmp_path / "state")

    assert path.name == PRIVATE_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert loaded.public_key_bytes == pair.public_key_bytes
    assert verify(pair.public_key_bytes, b"m", loaded.sign(b"m"))


def test_load_or_generate_reuses_the_saved_key(tmp_path: Path) -> None:
    first = AgentKeyPair.load_or_generate(tmp_path)
    second = AgentKeyPair.load_or_generate(tmp_path)

    assert first.public_key_bytes == second.public_key_bytes


def test_save_tightens_an_existing_world_readable_file(tmp_path: Path) -> None:
    (tmp_path / PRIVATE_KEY_FILE).write_bytes(b"old")
    (tmp_path / PRIVATE_KEY_FILE).chmod(0o644)

    path = AgentKeyPair.generate().save(tmp_path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
