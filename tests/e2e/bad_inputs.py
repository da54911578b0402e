"""The combined probe's catalogue: a bad input of every class on every surface, each with the
refusal it must get (an HTTP status and the rejection it is counted as, a WebSocket answer, or
the rejection a service counts for a bus entry).

The builders of the surface suites are reused: ``model`` and ``signed_by``
(``tests/integration/test_bad_input.py``), ``good_body`` (``test_sync_bad_input.py``),
``MAX_ID`` and ``DAY_MS`` (``test_forged_stream_ids.py``); the WebSocket frames are those of
``test_live_bad_input.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from federated_learning.bus.blobs import RedisBlobStore
from federated_learning.dashboard.limits import MAX_JSON_BODY_BYTES
from federated_learning.privacy.compression import CompressedUpdate, CompressionMethod
from federated_learning.privacy.signing import AgentKeyPair
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import (
    AgentJoined,
    AgentLeft,
    Heartbeat,
    TaskKind,
    UpdateSubmitted,
    encode,
)
from federated_learning.protocol.tensors import encode_layers
from federated_learning.protocol.updates import encode_compressed
from tests.integration.test_bad_input import model, signed_by
from tests.integration.test_forged_stream_ids import DAY_MS, MAX_ID
from tests.integration.test_sync_bad_input import good_body

KEYS = Keys()
NESTING = 100_000
"""Brackets deep: past every JSON parser's recursion limit, within the 1 MiB body limit."""
WS_FRAMES: tuple[str | bytes, ...] = (
    b"\x00\x01binary", "{" * 100_000, "[" * 900 + "]" * 900, "not json",
    json.dumps({"action": "subscribe", "training_id": {"nested": [1, 2]}}),
    json.dumps({"action": "subscribe", "training_id": "../x"}),
    json.dumps({"action": "drop"}))
"""Frames the live socket answers with an error frame and survives."""


@dataclass(frozen=True)
class HttpProbe:
    """One request and the refusal it must get.

    ``rejection`` is the ``source:reason`` the dashboard counts it as; None where it is refused
    before the dashboard's code sees it (by the HTTP server's parser).
    Sent as ``raw_head`` on a socket when set (headers no client library would send), else by
    httpx: ``chunks`` chunked, or ``body``.
    """

    name: str
    path: str
    status: int
    rejection: str | None
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    chunks: tuple[bytes, ...] = ()
    raw_head: str | None = None
    words: str = ""


def as_json(value: object) -> bytes:
    """``value`` as JSON, NaN and Infinity written as JavaScript would (``allow_nan``)."""
    return json.dumps(value, allow_nan=True).encode()


def nested(depth: int = NESTING) -> bytes:
    return b"[" * depth + b"]" * depth


def rest_probes(api_key: str, start: dict[str, Any]) -> list[HttpProbe]:
    """Bodies of ``POST /api/training/start`` (and two other routes) the dashboard must refuse."""
    auth = {"X-API-Key": api_key, "Content-Type": "application/json"}
    head = "POST /api/training/start HTTP/1.1\r\nHost: probe\r\nContent-Type: application/json\r\n"

    def start_with(**change: Any) -> bytes:
        return as_json({**start, **change})

    params = [("NaN", {"mu": float("nan")}), ("Infinity", {"mu": float("inf")}),
              ("-Infinity", {"mu": -float("inf")}), ("a boolean", {"mu": True}),
              ("1e300", {"mu": 1e300}), ("a 65-character name", {"m" * 65: 1}),
              ("33 entries", {f"p{i}": 1 for i in range(33)})]
    absurd: list[tuple[str, dict[str, Any]]] = [
        ("rounds", {"rounds": 10**12}), ("clients_per_round", {"clients_per_round": -1}),
        ("round_deadline_s", {"round_deadline_s": 1e300}), ("learning_rate", {"local": {"learning_rate": 1e9}}),
        ("a model of 10^8 parameters", {"model": {"trainer": "softmax", "num_features": 1_000_000,
                                                   "num_classes": 100}})]
    return [
        HttpProbe("no key, 50 MB declared", "/api/training/start", 413, "rest:too_large",
                  raw_head=head + "Content-Length: 50000000\r\n", body=b"{", words="exceeds"),
        HttpProbe("wrong key, 900 kB declared, 1 byte sent: refused unread", "/api/training/start", 401,
                  "rest:unauthorized", raw_head=head + "X-API-Key: wrong\r\nContent-Length: 900000\r\n",
                  body=b"{"),
        HttpProbe("no key, a chunked body of any length", "/api/training/start", 401, "rest:unauthorized",
                  raw_head=head + "Transfer-Encoding: chunked\r\n", body=b"10000\r\n" + b"x" * 0x10000),
        HttpProbe("Content-Length 10^12", "/api/training/start", 413, "rest:too_large",
                  raw_head=head + f"X-API-Key: {api_key}\r\nContent-Length: 1000000000000\r\n", words="exceeds"),
        HttpProbe("bogus Content-Length", "/api/training/start", 400, None,
                  raw_head=head + f"X-API-Key: {api_key}\r\nContent-Length: 12abc\r\n"),
        HttpProbe("negative Content-Length", "/api/training/start", 400, None,
                  raw_head=head + f"X-API-Key: {api_key}\r\nContent-Length: -5\r\n"),
        HttpProbe("chunked past 1 MiB", "/api/training/start", 413, "rest:too_large", headers=auth,
                  chunks=(b'{"name": "', *[b"x" * (MAX_JSON_BODY_BYTES // 2)] * 3, b'"}'), words="exceeds"),
        HttpProbe("not JSON", "/api/training/start", 422, "rest:invalid_body", headers=auth, body=b'{"name": ',
                  words="JSON"),
        *[HttpProbe(f"algorithm_params with {what}", "/api/training/start", 422, "rest:invalid_body",
                    headers=auth, body=start_with(algorithm_params=value), words="algorithm_params")
          for what, value in params],
        *[HttpProbe(f"absurd {what}", "/api/training/start", 422, "rest:invalid_body", headers=auth,
                    body=start_with(**change)) for what, change in absurd],
        HttpProbe("an unknown field", "/api/training/start", 422, "rest:invalid_body", headers=auth,
                  body=start_with(evil=1), words="evil"),
        HttpProbe("an unknown nested field", "/api/training/start", 422, "rest:invalid_body", headers=auth,
                  body=start_with(local={"epochs": 1, "evil": 1}), words="evil"),
        HttpProbe("deeply nested JSON", "/api/training/start", 422, "rest:invalid_body", headers=auth,
                  body=b'{"name": ' + nested() + b"}", words="nested too deeply"),
        HttpProbe("deeply nested JSON", "/api/orgs", 422, "rest:invalid_body", headers=auth,
                  body=b'{"org_id": ' + nested() + b"}", words="nested too deeply"),
        HttpProbe("an unknown field", "/api/orgs", 422, "rest:invalid_body", headers=auth,
                  body=as_json({"org_id": "evil", "name": "Evil", "owner": "root"}), words="owner"),
        HttpProbe("a stop reason of 100 kB", "/api/training/honest/stop", 422, "rest:invalid_body",
                  headers=auth, body=as_json({"reason": "x" * 100_000}), words="reason"),
    ]


def sync_probes(api_key: str, training_id: str) -> list[HttpProbe]:
    """``POST /sync_model`` bodies the dashboard must refuse before it submits anything."""
    auth = {"X-API-Key": api_key, "Content-Type": "application/json"}
    weight = np.zeros((64, 10)).tolist()

    def sync_with(**change: Any) -> bytes:
        return as_json({**good_body(), "training_id": training_id, **change})

    def weights(w: object = weight, b: object = [0.0] * 10, **extra: object) -> bytes:
        return sync_with(weights={"dense.weight": w, "dense.bias": b, **extra})

    nan = [[float("nan")] * 10] * 64
    cases: list[tuple[str, bytes, int, str, str]] = [
        ("a base version of 10^12", sync_with(base_version=10**12), 409, "stale_base", "not a recent version"),
        ("a base version of 2^70", sync_with(base_version=2**70), 409, "stale_base", "not a recent version"),
        ("a negative base version", sync_with(base_version=-1), 422, "invalid_body", "base_version"),
        ("strings as weights", weights(np.zeros((64, 10)).astype(str).tolist()), 422, "bad_dtype", "holds"),
        ("booleans as weights", weights(np.zeros((64, 10), bool).tolist()), 422, "bad_dtype", "bool"),
        ("nulls as weights", weights([[None] * 10] * 64), 422, "bad_dtype", "nulls"),
        ("a ragged layer", weights([[0.0] * 10] * 63 + [[0.0] * 9]), 422, "bad_shape", "inhomogeneous"),
        ("a transposed layer", weights(np.zeros((10, 64)).tolist()), 422, "bad_shape", "shape"),
        ("a missing layer", sync_with(weights={"dense.weight": weight}), 422, "bad_layers", "missing"),
        ("an extra layer", weights(extra=[0.0]), 422, "bad_layers", "unexpected"),
        ("NaN weights", weights(nan), 422, "not_finite", "NaN"),
        ("Infinity weights", weights(b=[float("inf")] * 10), 422, "not_finite", "NaN or Inf"),
        ("num_examples 2^63-1", sync_with(metrics={"num_examples": 2**63 - 1}), 422, "invalid_body", "num_examples"),
        ("a boolean accuracy", sync_with(metrics={"num_examples": 12, "accuracy": True}), 422, "invalid_body",
         "accuracy"),
        ("an unknown metric", sync_with(metrics={"num_examples": 12, "secret_weight": 1e9}), 422, "invalid_body",
         "secret_weight"),
        ("deeply nested weights", b'{"weights": {"w": ' + nested() + b"}}", 422, "invalid_body", "recursion"),
        ("a million values in 1 MB", b'{"client_id": "bot", "weights": {"w": [' + b"," * 1_000_000 + b"]}}",
         413, "too_large", "safetensors"),
    ]
    head = f"POST /sync_model HTTP/1.1\r\nHost: probe\r\nX-API-Key: {api_key}\r\nContent-Type: application/json\r\n"
    return [
        *[HttpProbe(what, "/sync_model", status, f"sync:{reason}", headers=auth, body=body, words=words)
          for what, body, status, reason, words in cases],
        HttpProbe("Content-Length 10^12", "/sync_model", 413, "sync:too_large",
                  raw_head=head + "Content-Length: 1000000000000\r\n", words="exceeds"),
        HttpProbe("chunked past max_blob_bytes", "/sync_model", 413, "sync:too_large", headers=auth,
                  chunks=(b'{"weights": {"w": [', *[b"0," * (1 << 19)] * 5, b"0]}}"), words="exceeds"),
        HttpProbe("safetensors that are not", "/sync_model", 422, "sync:bad_blob",
                  headers={"X-API-Key": api_key, "Content-Type": "application/octet-stream",
                           "X-Training-Id": training_id}, body=b"\xff" * 64, words="not the training's"),
        HttpProbe("X-Num-Examples NaN", "/sync_model", 422, "sync:invalid_header",
                  headers={"X-API-Key": api_key, "Content-Type": "application/octet-stream",
                           "X-Training-Id": training_id, "X-Num-Examples": "NaN"}, words="X-Num-Examples"),
    ]


# -- the bus, with an agent's own credentials ----------------------------------------------------


@dataclass(frozen=True)
class BusProbe:
    """One entry an agent writes, and the rejection (``source:reason``) a service counts it as;
    None for the one honest notice the replay after it copies."""

    name: str
    stream: str
    fields: Mapping[Any, Any]
    rejection: str | None
    entry_id: str = "*"


@dataclass(frozen=True)
class Attacker:
    """An agent with its own ACL user and key, selected in a training of its own (``own``, round 1)."""

    agent_id: str
    key: AgentKeyPair
    redis: aioredis.Redis
    own: str
    victim: str
    """The honest training, the round it is in, and an honest agent of it (whose id is forged)."""
    victim_round: int
    victim_agent: str

    def notice(self, digest: str | None = None, *, training_id: str | None = None, round_number: int = 1,
               agent_id: str | None = None, num_examples: int = 10, signed: bool = True) -> dict[str, str]:
        """The fields of an update notice, signed by the attacker's key unless ``signed`` is False."""
        notice = UpdateSubmitted(kind=TaskKind.TRAIN, training_id=training_id or self.own, round=round_number,
                                 attempt=1, agent_id=agent_id or self.agent_id, update_digest=digest or "0" * 64,
                                 num_examples=num_examples, received_model_version=0)
        signed_notice = signed_by(notice, self.key) if signed else notice
        return {"m": signed_notice.model_dump_json()}

    def message(self, message: Heartbeat | AgentJoined | AgentLeft,
                signer: AgentKeyPair | None = None) -> dict[str, str]:
        return {"m": signed_by(message, signer or self.key).model_dump_json()}

    async def upload(self, layers: dict[str, np.ndarray] | bytes) -> str:
        """Store ``layers`` (or raw bytes) as one of the attacker's uploads; its digest."""
        blobs = RedisBlobStore(self.redis, KEYS, max_bytes=1 << 30)
        return await blobs.put(layers if isinstance(layers, bytes) else encode_layers(layers), owner=self.agent_id)


def huge_compressed_update() -> bytes:
    """A compressed delta of a few bytes that declares a 2^31 x 2^31 layer."""
    update = CompressedUpdate(CompressionMethod.TOP_K, ((2**31, 2**31), (10,)),
                              {"indices": np.zeros(1, np.uint32), "values": np.ones(1, np.float32)})
    return encode_compressed(update)


async def update_probes(attacker: Attacker, max_blob_bytes: int) -> list[BusProbe]:
    """Update notices of every kind the coordinator refuses, then an honest one and its replay."""
    nan = np.zeros((64, 10), np.float32)
    nan[3, 3] = np.nan
    blobs = {
        "not_finite": await attacker.upload(model(weight=nan)),
        "bad_shape": await attacker.upload(model(weight=np.zeros((10, 64), np.float32))),
        "bad_dtype": await attacker.upload(model(bias=np.zeros(10, np.float64))),
        "bad_layers": await attacker.upload({"dense.weight": np.zeros((64, 10), np.float32)}),
        "bad_blob": await attacker.upload(b"\xff" * 64),
        "compressed": await attacker.upload(huge_compressed_update()),
        "good": await attacker.upload(model(bias=np.ones(10, np.float32))),
    }
    tampered = await attacker.upload(model(bias=np.full(10, 2, np.float32)))
    await attacker.redis.set(KEYS.blob(tampered, attacker.agent_id),
                             encode_layers(model(bias=np.full(10, 9, np.float32))))
    oversized = "f" * 64
    await attacker.redis.set(KEYS.blob(oversized, attacker.agent_id), b"x" * (max_blob_bytes + 1))
    raw = json.loads(attacker.notice(blobs["good"])["m"])
    updates = KEYS.update_stream
    good = attacker.notice(blobs["good"])
    return [
        BusProbe("not JSON", updates, {"m": "{not json"}, "updates:malformed"),
        BusProbe("schema version 99", updates, {"m": '{"schema_version": 99}'}, "updates:malformed"),
        BusProbe("num_examples 2^63-1", updates, {"m": json.dumps({**raw, "num_examples": 2**63 - 1})},
                 "updates:malformed"),
        BusProbe("an unknown training", updates, attacker.notice(training_id="nowhere"), "updates:unknown_training"),
        BusProbe("an unknown agent", updates, attacker.notice(agent_id="ghost"), "updates:unknown_agent"),
        BusProbe("an honest agent's notice signed by the attacker", updates,
                 attacker.notice(training_id=attacker.victim, agent_id=attacker.victim_agent), "updates:bad_signature"),
        BusProbe("unsigned", updates, attacker.notice(signed=False), "updates:unsigned"),
        BusProbe("a round 10^6 ahead", updates, attacker.notice(training_id=attacker.victim, round_number=10**6),
                 "updates:stale_round"),
        BusProbe("a round of the honest training it was not asked in", updates,
                 attacker.notice(training_id=attacker.victim, round_number=attacker.victim_round),
                 "updates:not_selected"),
        BusProbe("10^9 examples", updates, attacker.notice(blobs["good"], num_examples=10**9),
                 "updates:too_many_examples"),
        *[BusProbe(f"a {reason} blob", updates, attacker.notice(blobs[reason]), f"updates:{reason}")
          for reason in ("not_finite", "bad_shape", "bad_dtype", "bad_layers", "bad_blob")],
        BusProbe("a compressed blob declaring 2^62 values", updates, attacker.notice(blobs["compressed"]),
                 "updates:bad_shape"),
        BusProbe("a blob over max_blob_bytes", updates, attacker.notice(oversized), "updates:too_large"),
        BusProbe("a blob that is not its digest's", updates, attacker.notice(tampered), "updates:hash_mismatch"),
        BusProbe("no blob", updates, attacker.notice("e" * 64), "updates:blob_missing"),
        BusProbe("an honest notice", updates, good, None),
        BusProbe("the honest notice replayed", updates, good, "updates:duplicate"),
    ]


def agent_probes(attacker: Attacker, now_s: float) -> list[BusProbe]:
    """Joins, heartbeats and leaves the coordinator refuses."""
    other = AgentKeyPair.generate()
    beat = Heartbeat(agent_id=attacker.agent_id).model_dump(mode="json")
    join = AgentJoined(agent_id="junk", datasets={"probe": 10}, public_key=other.public_key_bytes.hex()
                       ).model_dump(mode="json")
    junk = [("a NaN send time", {**beat, "sent_at": float("nan")}),
            ("an infinite send time", {**beat, "sent_at": float("inf")}),
            ("33 device facts", {**join, "device": {f"k{i}": "x" for i in range(33)}}),
            ("a device fact of 257 characters", {**join, "device": {"os": "x" * 257}}),
            ("2^70 examples", {**join, "datasets": {"probe": 2**70}}),
            ("65 datasets", {**join, "datasets": {f"d{i}": 1 for i in range(65)}}),
            ("schema version 99", {"schema_version": 99})]
    agents = KEYS.agent_stream
    own_key = attacker.key.public_key_bytes.hex()
    return [
        *[BusProbe(what, agents, {"m": json.dumps(body, allow_nan=True)}, "agents:malformed") for what, body in junk],
        BusProbe("an honest agent's heartbeat signed by the attacker", agents,
                 attacker.message(Heartbeat(agent_id=attacker.victim_agent)), "agents:bad_signature"),
        BusProbe("an honest agent's leave signed by the attacker", agents,
                 attacker.message(AgentLeft(agent_id=attacker.victim_agent, reason="forged")), "agents:bad_signature"),
        BusProbe("its own join signed by another key", agents,
                 attacker.message(AgentJoined(agent_id=attacker.agent_id, datasets={"probe": 10**6},
                                              public_key=own_key), other), "agents:bad_signature"),
        BusProbe("its own join with a new key", agents,
                 attacker.message(AgentJoined(agent_id=attacker.agent_id, datasets={"probe": 10**6},
                                              public_key=other.public_key_bytes.hex()), other), "agents:key_mismatch"),
        BusProbe("an unsigned heartbeat", agents, {"m": Heartbeat(agent_id=attacker.agent_id).model_dump_json()},
                 "agents:unsigned"),
        BusProbe("a heartbeat of an hour ago", agents,
                 attacker.message(Heartbeat(agent_id=attacker.agent_id, sent_at=now_s - 3600)), "agents:stale_message"),
    ]


def forged_id_probes(attacker: Attacker, server_ms: int) -> list[BusProbe]:
    """Entries with writer-chosen ids: a day ahead, and the maximum id, on both agent streams."""
    beat = encode(Heartbeat(agent_id=attacker.agent_id))
    return [BusProbe(f"{label} on {source}", stream, beat, f"{source}:forged_stream_id", entry_id)
            for source, stream in (("agents", KEYS.agent_stream), ("updates", KEYS.update_stream))
            for label, entry_id in (("an id a day ahead", f"{server_ms + DAY_MS}-0"), ("the maximum id", MAX_ID))]
