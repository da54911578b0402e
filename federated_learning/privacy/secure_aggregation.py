"""Pairwise-masking secure aggregation with double masking and Shamir-shared seeds.

Implements the semi-honest protocol of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017 (Fig. 4 without the signature and
consistency-check rounds): the server learns the sum of the survivors' updates and
nothing else about any one of them, even when up to n - t agents drop out.

Rounds, as pure client/server steps (the transport is the caller's):
0. AdvertiseKeys: each agent sends two X25519 public keys, c (encrypts shares) and s
   (agrees pairwise mask seeds). The server answers with the `Roster` (all keys, sorted
   by agent id; Shamir x-coordinate = 1-based position).
1. ShareKeys: each agent Shamir-splits (threshold t) its s private key and a fresh 32-byte
   self-mask seed b_u, one `ShareBundle` per roster member. Bundles are returned in
   plaintext here; on the wire each MUST be sealed with `encrypt_share` under the
   pairwise c-key (`SecAggClient.share_key`), AES-256-GCM, so the server cannot read them.
   Agents who send their bundles form U2; each agent masks only with the U2 members it
   received bundles from.
2. MaskedInput: agent u uploads, modulo 2**32,
       y_u = encode(x_u) + PRG(b_u) + sum_{v in U2, u < v} PRG(s_uv)
                                   - sum_{v in U2, v < u} PRG(s_uv)
   with s_uv = HKDF(X25519(s_u, s_v)) (so pair i < j adds +mask for i and -mask for j).
   Senders form U3.
3. Unmasking: each survivor returns, for every dropped agent (U2 minus U3), its share of
   that agent's s key, and for every survivor its share of b. It never reveals both
   shares of one agent. With t responses the server rebuilds the dropped agents' pairwise
   masks with the survivors and the survivors' self-masks, removes them, and decodes.

PRG: AES-256-CTR keystream (zero IV; every key is single-use, derived per session and
pair), read as little-endian uint32. Keys are derived with HKDF-SHA256 salted by the
session id, so masks never repeat across rounds.

Fixed point (`FixedPointCodec`): x -> round(clip(x, -R, R) * scale) mod 2**32, the
two's-complement embedding of int32. Sums wrap modulo 2**32, and the decoded sum is exact
as long as |sum| < 2**31, i.e. for at most floor((2**31 - 1) / round(R * scale)) agents
(`max_agents`; 32767 with the defaults R = 1, scale = 2**16). Each agent adds at most
0.5 / scale of rounding error per coordinate. Clip updates to L2 norm C and use R = C:
no coordinate then exceeds R.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from federated_learning.privacy.errors import (
    AggregationOverflow,
    InsufficientSurvivors,
    ProtocolViolation,
    ShareDecryptionFailed,
)
from federated_learning.privacy.shamir import (
    SHAMIR_PRIME,
    Share,
    lagrange_coefficients_at_zero,
    shamir_split,
)

MASK_MODULUS_BITS = 32
"""Masked vectors live in Z / 2**32 (numpy uint32 arithmetic wraps)."""

KEY_BYTES = 32
_GCM_NONCE_BYTES = 12
_CTR_IV = bytes(16)
_LABEL_PAIRWISE = b"fl-secagg/v1/pairwise-mask"
_LABEL_SHARE_KEY = b"fl-secagg/v1/share-encryption"

MaskVector = NDArray[np.uint32]


@dataclass(frozen=True)
class FixedPointCodec:
    """Floats <-> uint32 fixed point: round(clip(x, -clip_range, clip_range) * scale) mod 2**32."""

    scale: float = 2.0**16
    clip_range: float = 1.0

    def __post_init__(self) -> None:
        if not (self.scale > 0.0 and math.isfinite(self.scale)):
            raise ValueError(f"fixed-point scale must be finite and > 0; got {self.scale}")
        if not (self.clip_range > 0.0 and math.isfinite(self.clip_range)):
            raise ValueError(f"clip range must be finite and > 0; got {self.clip_range}")
        if self.max_agents < 1:
            raise ValueError(
                f"clip range * scale = {self.clip_range * self.scale:g} does not fit in int32"
            )

    @property
    def max_agents(self) -> int:
        """Most agents whose sum cannot wrap: floor((2**31 - 1) / round(clip_range * scale))."""
        return (2**31 - 1) // max(1, round(self.clip_range * self.scale))

    def encode(self, values: NDArray[np.floating]) -> MaskVector:
        """1-D floats -> uint32 codes (two's complement of the rounded fixed-point value)."""
        clipped = np.clip(np.asarray(values, dtype=np.float64), -self.clip_range, self.clip_range)
        result: MaskVector = np.rint(clipped * self.scale).astype(np.int64).astype(np.uint32)
        return result

    def decode_sum(self, total: MaskVector, num_agents: int) -> NDArray[np.float64]:
        """Float64 sum of num_agents encoded vectors, from their sum modulo 2**32."""
        if num_agents > self.max_agents:
            raise AggregationOverflow(num_agents, self.max_agents)
        decoded: NDArray[np.float64] = total.view(np.int32).astype(np.float64) / self.scale
        return decoded


def expand_mask(seed: bytes, length: int) -> MaskVector:
    """length uint32 words of AES-256-CTR keystream under the 32-byte seed (read-only array)."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"mask seed must be {KEY_BYTES} bytes; got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_CTR_IV)).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(secret)


def _pair_info(label: bytes, a: str, b: str) -> bytes:
    low, high = sorted((a, b))
    return b"\x00".join((label, low.encode(), high.encode()))


def pairwise_seed(
    private_key: X25519PrivateKey, peer_public_key: bytes, session_id: bytes,
    agent_id: str, peer_id: str,
) -> bytes:
    """s_uv = HKDF-SHA256(X25519(s_u, s_v); salt = session id, info = label | sorted ids)."""
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    return _hkdf(shared, session_id, _pair_info(_LABEL_PAIRWISE, agent_id, peer_id))


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters every participant must agree on for one aggregation session."""

    session_id: bytes
    threshold: int
    vector_length: int
    codec: FixedPointCodec = field(default_factory=FixedPointCodec)
    self_mask: bool = True

    def __post_init__(self) -> None:
        if not self.session_id:
            raise ValueError("session id must not be empty")
        if self.threshold < 1:
            raise ValueError(f"threshold must be >= 1; got {self.threshold}")
        if self.vector_length < 1:
            raise ValueError(f"vector length must be >= 1; got {self.vector_length}")


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0, agent -> server: the agent's two X25519 public keys (32 raw bytes each)."""

    agent_id: str
    cipher_public_key: bytes
    mask_public_key: bytes


@dataclass(frozen=True)
class Roster:
    """Round 0, server -> agents: the session config and all advertised keys, sorted by id."""

    config: SecAggConfig
    keys: tuple[AdvertiseKeys, ...]

    def index(self, agent_id: str) -> int:
        """Shamir x-coordinate of the agent: its 1-based position in the roster."""
        for position, keys in enumerate(self.keys, start=1):
            if keys.agent_id == agent_id:
                return position
        raise ProtocolViolation(f"agent '{agent_id}' is not in the roster")

    def keys_of(self, agent_id: str) -> AdvertiseKeys:
        """The public keys the agent advertised."""
        return self.keys[self.index(agent_id) - 1]

    @property
    def agent_ids(self) -> tuple[str, ...]:
        return tuple(keys.agent_id for keys in self.keys)


@dataclass(frozen=True)
class ShareBundle:
    """Round 1, sender -> recipient (via the server): the recipient's shares of the sender's
    s private key and self-mask seed. Plaintext: seal with `encrypt_share` for transport."""

    sender: str
    recipient: str
    mask_key_share: Share
    self_seed_share: Share | None


@dataclass(frozen=True)
class EncryptedShareBundle:
    """A `ShareBundle` sealed with AES-256-GCM; sender and recipient are authenticated."""

    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, agent -> server: the masked fixed-point update, uint32 of vector_length."""

    agent_id: str
    vector: MaskVector


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3, server -> survivors: who uploaded (survivors) and who did not (dropped)."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3, survivor -> server: shares of the dropped agents' s keys and of the
    survivors' self-mask seeds, keyed by whose secret they are."""

    agent_id: str
    mask_key_shares: Mapping[str, Share]
    self_seed_shares: Mapping[str, Share]


def _share_aad(session_id: bytes, sender: str, recipient: str) -> bytes:
    return b"\x00".join((session_id, sender.encode(), recipient.encode()))


def encrypt_share(bundle: ShareBundle, key: bytes, session_id: bytes) -> EncryptedShareBundle:
    """Seal a bundle with AES-256-GCM under the sender-recipient key (random 96-bit nonce)."""
    plaintext = json.dumps({
        "mask": [bundle.mask_key_share.x, hex(bundle.mask_key_share.y)],
        "self": None if bundle.self_seed_share is None
        else [bundle.self_seed_share.x, hex(bundle.self_seed_share.y)],
    }).encode()
    nonce = os.urandom(_GCM_NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(
        nonce, plaintext, _share_aad(session_id, bundle.sender, bundle.recipient)
    )
    return EncryptedShareBundle(bundle.sender, bundle.recipient, nonce, ciphertext)


def decrypt_share(sealed: EncryptedShareBundle, key: bytes, session_id: bytes) -> ShareBundle:
    """Open a sealed bundle; raises ShareDecryptionFailed if it does not authenticate."""
    try:
        plaintext = AESGCM(key).decrypt(
            sealed.nonce, sealed.ciphertext, _share_aad(session_id, sealed.sender, sealed.recipient)
        )
    except InvalidTag as error:
        raise ShareDecryptionFailed(
            f"share from '{sealed.sender}' to '{sealed.recipient}' does not authenticate"
        ) from error
    fields = json.loads(plaintext)
    self_share = None if fields["self"] is None else Share(fields["self"][0],
                                                          int(fields["self"][1], 16))
    return ShareBundle(sealed.sender, sealed.recipient,
                       Share(fields["mask"][0], int(fields["mask"][1], 16)), self_share)


class SecAggClient:
    """One agent's side of a secure-aggregation session (keys, shares, masking, unmasking)."""

    def __init__(
        self, agent_id: str, cipher_key: X25519PrivateKey, mask_key: X25519PrivateKey,
        self_seed: bytes,
    ) -> None:
        if len(self_seed) != KEY_BYTES:
            raise ValueError(f"self-mask seed must be {KEY_BYTES} bytes; got {len(self_seed)}")
        self.agent_id = agent_id
        self._cipher_key = cipher_key
        self._mask_key = mask_key
        self._self_seed = self_seed
        self._roster: Roster | None = None
        self._held: dict[str, ShareBundle] = {}
        self._revealed_mask_keys: set[str] = set()
        self._revealed_self_seeds: set[str] = set()

    @classmethod
    def generate(cls, agent_id: str) -> SecAggClient:
        """Fresh keys and self-mask seed from the OS CSPRNG (one client per session)."""
        return cls(agent_id, X25519PrivateKey.generate(), X25519PrivateKey.generate(),
                   os.urandom(KEY_BYTES))

    @classmethod
    def from_secrets(
        cls, agent_id: str, cipher_key: bytes, mask_key: bytes, self_seed: bytes
    ) -> SecAggClient:
        """Client with given 32-byte secrets, for reproducible tests."""
        return cls(agent_id, X25519PrivateKey.from_private_bytes(cipher_key),
                   X25519PrivateKey.from_private_bytes(mask_key), self_seed)

    def advertise(self) -> AdvertiseKeys:
        """Round 0: the public keys to send to the server."""
        return AdvertiseKeys(self.agent_id, self._cipher_key.public_key().public_bytes_raw(),
                             self._mask_key.public_key().public_bytes_raw())

    def share_key(self, peer_id: str) -> bytes:
        """AES-256-GCM key shared with a peer: HKDF(X25519(c_u, c_v)) over the session."""
        roster = self._require_roster()
        shared = self._cipher_key.exchange(
            X25519PublicKey.from_public_bytes(roster.keys_of(peer_id).cipher_public_key)
        )
        return _hkdf(shared, roster.config.session_id,
                     _pair_info(_LABEL_SHARE_KEY, self.agent_id, peer_id))

    def share_keys(self, roster: Roster) -> list[ShareBundle]:
        """Round 1: Shamir-split the s key and self seed; one bundle per other roster member."""
        _check_roster(roster)
        if roster.keys_of(self.agent_id) != self.advertise():
            raise ProtocolViolation(f"roster carries other keys for agent '{self.agent_id}'")
        self._roster = roster
        config, n = roster.config, len(roster.keys)
        mask_shares = shamir_split(
            int.from_bytes(self._mask_key.private_bytes_raw(), "big"), n, config.threshold)
        no_shares: list[Share | None] = [None] * n
        self_shares: Sequence[Share | None] = (
            shamir_split(int.from_bytes(self._self_seed, "big"), n, config.threshold)
            if config.self_mask else no_shares
        )
        bundles = [ShareBundle(self.agent_id, keys.agent_id, mask_shares[k], self_shares[k])
                   for k, keys in enumerate(roster.keys)]
        own = roster.index(self.agent_id) - 1
        self._held = {self.agent_id: bundles[own]}
        return bundles[:own] + bundles[own + 1:]

    def receive_shares(self, bundles: Iterable[ShareBundle]) -> None:
        """Round 1 delivery: keep the shares other agents made for this agent."""
        roster = self._require_roster()
        own_x = roster.index(self.agent_id)
        for bundle in bundles:
            if bundle.recipient != self.agent_id:
                raise ProtocolViolation(
                    f"agent '{self.agent_id}' got a share addressed to '{bundle.recipient}'")
            roster.index(bundle.sender)
            if bundle.mask_key_share.x != own_x:
                raise ProtocolViolation(
                    f"share from '{bundle.sender}' has x={bundle.mask_key_share.x}; "
                    f"agent '{self.agent_id}' holds x={own_x}")
            self._held[bundle.sender] = bundle

    def open_shares(self, sealed: Iterable[EncryptedShareBundle]) -> list[ShareBundle]:
        """Decrypt bundles sealed by their senders with `encrypt_share`."""
        session_id = self._require_roster().config.session_id
        return [decrypt_share(s, self.share_key(s.sender), session_id) for s in sealed]

    def seal_shares(self, bundles: Iterable[ShareBundle]) -> list[EncryptedShareBundle]:
        """Encrypt this agent's outgoing bundles for their recipients."""
        session_id = self._require_roster().config.session_id
        return [encrypt_share(b, self.share_key(b.recipient), session_id) for b in bundles]

    def mask(self, values: NDArray[np.floating]) -> MaskedInput:
        """Round 2: encode a flat float update and add the self mask and pairwise masks."""
        roster = self._require_roster()
        config = roster.config
        flat = np.asarray(values).ravel()
        if flat.size != config.vector_length:
            raise ValueError(
                f"update has {flat.size} values; session expects {config.vector_length}")
        if len(self._held) < config.threshold:
            raise InsufficientSurvivors("share keys", len(self._held), config.threshold)
        masked = config.codec.encode(flat)
        if config.self_mask:
            masked += expand_mask(self._self_seed, flat.size)
        own = roster.index(self.agent_id)
        for peer_id in self._held:
            if peer_id == self.agent_id:
                continue
            seed = pairwise_seed(self._mask_key, roster.keys_of(peer_id).mask_public_key,
                                 config.session_id, self.agent_id, peer_id)
            if own < roster.index(peer_id):
                masked += expand_mask(seed, flat.size)
            else:
                masked -= expand_mask(seed, flat.size)
        return MaskedInput(self.agent_id, masked)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Round 3: shares of dropped agents' s keys and of survivors' self seeds.

        Raises:
            ProtocolViolation: the request would reveal both secrets of one agent (which
                would unmask its input), or names agents this one did not mask with.
            InsufficientSurvivors: fewer survivors than the threshold.
        """
        config = self._require_roster().config
        survivors, dropped = set(request.survivors), set(request.dropped)
        if self.agent_id not in survivors:
            raise ProtocolViolation(f"agent '{self.agent_id}' is not among the survivors")
        if len(survivors) < config.threshold:
            raise InsufficientSurvivors("unmasking", len(survivors), config.threshold)
        unknown = (survivors | dropped) - self._held.keys()
        if unknown:
            raise ProtocolViolation(f"unmask request names unknown agents {sorted(unknown)}")
        both = (survivors & dropped) | (survivors & self._revealed_mask_keys) \
            | (dropped & self._revealed_self_seeds)
        if both:
            raise ProtocolViolation(
                f"refusing to reveal both mask secrets of agents {sorted(both)}")
        self._revealed_mask_keys |= dropped
        mask_key_shares = {u: self._held[u].mask_key_share for u in sorted(dropped)}
        self_seed_shares: dict[str, Share] = {}
        if config.self_mask:
            self._revealed_self_seeds |= survivors
            self_seed_shares = {v: share for v in sorted(survivors)
                                if (share := self._held[v].self_seed_share) is not None}
        return UnmaskResponse(self.agent_id, mask_key_shares, self_seed_shares)

    def _require_roster(self) -> Roster:
        if self._roster is None:
            raise ProtocolViolation(f"agent '{self.agent_id}' has not received the roster")
        return self._roster


def _check_roster(roster: Roster) -> None:
    ids = roster.agent_ids
    if len(set(ids)) != len(ids):
        raise ProtocolViolation("roster lists an agent twice")
    public_keys = [k.cipher_public_key for k in roster.keys] + [k.mask_public_key
                                                                for k in roster.keys]
    if len(set(public_keys)) != len(public_keys):
        raise ProtocolViolation("roster repeats a public key")
    if len(ids) < roster.config.threshold:
        raise InsufficientSurvivors("advertise keys", len(ids), roster.config.threshold)


class SecAggServer:
    """The server's side of one session: routes shares, sums masked inputs, removes masks."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self._keys: dict[str, AdvertiseKeys] = {}
        self._roster: Roster | None = None
        self._outbox: dict[str, list[ShareBundle | EncryptedShareBundle]] = {}
        self._share_senders: set[str] = set()
        self._total = np.zeros(config.vector_length, dtype=np.uint32)
        self._uploaded: set[str] = set()

    @classmethod
    def resume(cls, roster: Roster, share_senders: Iterable[str]) -> SecAggServer:
        """A server past round 1, rebuilt from the published roster and who sent shares (the
        shares themselves went to the agents and are not needed to unmask)."""
        server = cls(roster.config)
        for keys in roster.keys:
            server.register(keys)
        server.roster()
        senders = set(share_senders)
        unknown = senders - set(roster.agent_ids)
        if unknown:
            raise ProtocolViolation(f"share senders {sorted(unknown)} are not in the roster")
        server._share_senders = senders
        return server

    def register(self, keys: AdvertiseKeys) -> None:
        """Round 0: accept an agent's public keys (before the roster is published)."""
        if self._roster is not None:
            raise ProtocolViolation(f"roster already published; '{keys.agent_id}' is too late")
        if keys.agent_id in self._keys:
            raise ProtocolViolation(f"agent '{keys.agent_id}' advertised keys twice")
        for key in (keys.cipher_public_key, keys.mask_public_key):
            if len(key) != KEY_BYTES:
                raise ProtocolViolation(
                    f"agent '{keys.agent_id}' sent a {len(key)}-byte key; X25519 keys are 32")
        self._keys[keys.agent_id] = keys

    def roster(self) -> Roster:
        """Close round 0 and publish the roster (needs at least `threshold` agents)."""
        if self._roster is None:
            roster = Roster(self.config, tuple(self._keys[a] for a in sorted(self._keys)))
            _check_roster(roster)
            self._roster = roster
        return self._roster

    def submit_shares(
        self, sender: str, bundles: Iterable[ShareBundle | EncryptedShareBundle]
    ) -> None:
        """Round 1: take one agent's outgoing bundles (sealed or not) for delivery."""
        roster = self._require_roster()
        roster.index(sender)
        if sender in self._share_senders:
            raise ProtocolViolation(f"agent '{sender}' sent its shares twice")
        bundles = list(bundles)
        recipients = sorted(b.recipient for b in bundles)
        expected = sorted(a for a in roster.agent_ids if a != sender)
        if recipients != expected or any(b.sender != sender for b in bundles):
            raise ProtocolViolation(
                f"agent '{sender}' must send one bundle to each other roster member")
        self._share_senders.add(sender)
        for bundle in bundles:
            self._outbox.setdefault(bundle.recipient, []).append(bundle)

    def deliveries(self) -> dict[str, list[ShareBundle | EncryptedShareBundle]]:
        """Close round 1: the bundles each share sender receives (from the other senders)."""
        threshold = self.config.threshold
        if len(self._share_senders) < threshold:
            raise InsufficientSurvivors("share keys", len(self._share_senders), threshold)
        return {recipient: [b for b in self._outbox.get(recipient, [])
                            if b.sender in self._share_senders]
                for recipient in sorted(self._share_senders)}

    def submit_masked(self, masked: MaskedInput) -> None:
        """Round 2: add one masked input to the running sum modulo 2**32."""
        if masked.agent_id not in self._share_senders:
            raise ProtocolViolation(f"agent '{masked.agent_id}' did not take part in round 1")
        if masked.agent_id in self._uploaded:
            raise ProtocolViolation(f"agent '{masked.agent_id}' uploaded twice")
        vector = np.asarray(masked.vector)
        if vector.dtype != np.uint32 or vector.shape != (self.config.vector_length,):
            raise ProtocolViolation(
                f"masked input of '{masked.agent_id}' must be uint32[{self.config.vector_length}]"
                f"; got {vector.dtype}{list(vector.shape)}")
        self._total += vector
        self._uploaded.add(masked.agent_id)

    def unmask_request(self) -> UnmaskRequest:
        """Close round 2: survivors = uploaders; dropped = round-1 agents that did not upload."""
        if len(self._uploaded) < self.config.threshold:
            raise InsufficientSurvivors("masked input", len(self._uploaded), self.config.threshold)
        return UnmaskRequest(tuple(sorted(self._uploaded)),
                             tuple(sorted(self._share_senders - self._uploaded)))

    def aggregate(self, responses: Iterable[UnmaskResponse]) -> NDArray[np.float64]:
        """Round 3: remove all masks and decode; returns the float64 sum of survivors' inputs.

        Raises:
            InsufficientSurvivors: fewer than `threshold` survivors answered.
        """
        request = self.unmask_request()
        answered = {r.agent_id: r for r in responses if r.agent_id in self._uploaded}
        if len(answered) < self.config.threshold:
            raise InsufficientSurvivors("unmasking", len(answered), self.config.threshold)
        roster = self._require_roster()
        helpers = [answered[a] for a in sorted(answered)][: self.config.threshold]
        weights = lagrange_coefficients_at_zero([roster.index(h.agent_id) for h in helpers])
        total = self._total.copy()
        for dropped in request.dropped:
            self._remove_pairwise_masks(total, dropped, request.survivors,
                                        _combine(weights, helpers, dropped, "mask key"))
        if self.config.self_mask:
            for survivor in request.survivors:
                seed = _combine(weights, helpers, survivor, "self seed")
                total -= expand_mask(seed.to_bytes(KEY_BYTES, "big"), total.size)
        return self.config.codec.decode_sum(total, len(request.survivors))

    def _remove_pairwise_masks(
        self, total: MaskVector, dropped: str, survivors: Sequence[str], secret: int
    ) -> None:
        roster = self._require_roster()
        try:
            key = X25519PrivateKey.from_private_bytes(secret.to_bytes(KEY_BYTES, "big"))
        except (OverflowError, ValueError) as error:
            raise ProtocolViolation(f"shares of '{dropped}' rebuild no valid key") from error
        if key.public_key().public_bytes_raw() != roster.keys_of(dropped).mask_public_key:
            raise ProtocolViolation(f"shares of '{dropped}' rebuild a key that does not match")
        dropped_index = roster.index(dropped)
        for survivor in survivors:
            seed = pairwise_seed(key, roster.keys_of(survivor).mask_public_key,
                                 self.config.session_id, dropped, survivor)
            if roster.index(survivor) < dropped_index:
                total -= expand_mask(seed, total.size)
            else:
                total += expand_mask(seed, total.size)

    def _require_roster(self) -> Roster:
        if self._roster is None:
            raise ProtocolViolation("roster not published yet")
        return self._roster


def _combine(weights: Sequence[int], helpers: Sequence[UnmaskResponse], owner: str,
             kind: str) -> int:
    """Interpolate one secret of `owner` from the helpers' shares with precomputed weights."""
    total = 0
    for weight, helper in zip(weights, helpers, strict=True):
        shares = helper.mask_key_shares if kind == "mask key" else helper.self_seed_shares
        share = shares.get(owner)
        if share is None:
            raise ProtocolViolation(f"agent '{helper.agent_id}' sent no {kind} share of '{owner}'")
        total += weight * share.y
    return total % SHAMIR_PRIME


@dataclass(frozen=True)
class SecAggCost:
    """Wall-clock cost of one simulated session (seconds) and its decoding error."""

    num_agents: int
    vector_length: int
    dropouts: int
    threshold: int
    client_share_seconds: float
    client_mask_seconds: float
    server_unmask_seconds: float
    max_abs_error: float


def run_session(
    updates: Mapping[str, NDArray[np.floating]], config: SecAggConfig, drop: Iterable[str] = (),
) -> tuple[NDArray[np.float64], SecAggCost]:
    """Run all rounds in memory; agents in `drop` vanish after round 1 (before upload).

    Returns:
        (decoded float64 sum of the survivors' updates, timings).
    """
    dropped = set(drop)
    clients = {agent_id: SecAggClient.generate(agent_id) for agent_id in updates}
    server = SecAggServer(config)
    for client in clients.values():
        server.register(client.advertise())
    roster = server.roster()
    started = time.perf_counter()
    for agent_id, client in clients.items():
        server.submit_shares(agent_id, client.share_keys(roster))
    share_seconds = (time.perf_counter() - started) / len(clients)
    for recipient, bundles in server.deliveries().items():
        clients[recipient].receive_shares(b for b in bundles if isinstance(b, ShareBundle))
    survivors = [a for a in clients if a not in dropped]
    started = time.perf_counter()
    for agent_id in survivors:
        server.submit_masked(clients[agent_id].mask(updates[agent_id]))
    mask_seconds = (time.perf_counter() - started) / max(1, len(survivors))
    request = server.unmask_request()
    responses = [clients[a].unmask(request) for a in request.survivors]
    started = time.perf_counter()
    total = server.aggregate(responses)
    unmask_seconds = time.perf_counter() - started
    expected = np.zeros(config.vector_length)
    for agent_id in survivors:
        expected += np.asarray(updates[agent_id], dtype=np.float64).ravel()
    cost = SecAggCost(len(updates), config.vector_length, len(dropped), config.threshold,
                      share_seconds, mask_seconds, unmask_seconds,
                      float(np.max(np.abs(total - expected))))
    return total, cost


def measure_secagg_cost(
    num_agents: int = 69, vector_length: int = 1_000_000, dropouts: Sequence[int] = (0, 5),
    threshold: int | None = None, seed: int = 0,
) -> list[SecAggCost]:
    """Time full sessions of num_agents agents on random updates in [-1, 1), per dropout count.

    threshold defaults to floor(2n/3) + 1. Client times are per agent (mean); server time
    covers mask removal and decoding only.
    """
    rng = np.random.default_rng(seed)
    threshold = threshold if threshold is not None else 2 * num_agents // 3 + 1
    updates = {f"agent-{i:03d}": rng.uniform(-1.0, 1.0, vector_length).astype(np.float32)
               for i in range(num_agents)}
    costs = []
    for count in dropouts:
        config = SecAggConfig(os.urandom(16), threshold, vector_length)
        costs.append(run_session(updates, config, list(updates)[:count])[1])
    return costs
