"""Additively homomorphic aggregation with Paillier encryption (python-paillier, ``phe``).

Paillier, "Public-Key Cryptosystems Based on Composite Degree Residuosity Classes",
EUROCRYPT 1999. With public key n = p q and g = n + 1, a plaintext m in Z_n encrypts to
    E(m) = (1 + n m) r**n mod n**2,    r uniform in Z*_n, fresh per encryption,
and E(a) E(b) mod n**2 = E(a + b mod n): whoever holds only the public key can add
encrypted vectors by multiplying ciphertexts, but cannot read them (IND-CPA under the
decisional composite residuosity assumption). Fresh r makes two encryptions of equal
updates differ.

Roles and trust model. Agents encrypt under the public key of a `KeyHolder` (e.g. the
privacy manager, run by another operator or on another host). The `HEAggregator` holds
the public key only: it checks and multiplies the uploads and hands one encrypted sum to
the key holder, which decrypts the sum, never an individual upload. This protects the
individual updates against an honest-but-curious aggregator (and anyone reading the
upload stream) as long as the aggregator and the key holder do not collude. It does NOT
protect against:
- a key holder that is given individual ciphertexts (collusion, or a malicious aggregator
  that forwards one agent's upload as an "aggregate": the key holder checks the claimed
  agent count, `min_agents`, but cannot verify it);
- malicious agents: there are no range proofs, so an agent can encrypt any slot value,
  including one that carries into its neighbours in a packed plaintext; use signed
  uploads against tampering in transit (ciphertexts are malleable) and robust rules or DP
  against poisoning;
- what the sum itself reveals (add DP noise before releasing it).
``phe`` has no threshold decryption, so one party holds the whole private key; removing
that trust needs threshold Paillier (Damgard and Jurik, PKC 2001), not implemented here.
Dropouts cost nothing: the sum covers whoever uploaded.

Fixed point (`FixedPointCodec` semantics from `secure_aggregation`): x -> q =
round(clip(x, -R, R) * scale), |q| <= M = round(R * scale). Paillier plaintexts are
non-negative, so each slot holds q + M in [0, 2M]; the sum of K agents is in [0, 2 M K]
and decodes as (slot - K M) / scale, with at most K * 0.5 / scale rounding error.

Packing (`HEConfig.pack`): with slot width b = bit_length(2 M max_agents) bits and
s = floor((bits(n) - 1) / b) slots per plaintext, coordinate i * s + j sits in plaintext
i at bits [j b, (j + 1) b). A slot's sum over at most max_agents agents is < 2**b, so no
carry crosses slots, and a plaintext is < 2**(s b) <= 2**(bits(n) - 1) < n, so no sum
wraps modulo n. Defaults (R = 1, scale = 2**16, max_agents = 128, 2048-bit n):
b = 25, s = 81 values per 512-byte ciphertext.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

from federated_learning.privacy.errors import PrivacyError, ProtocolViolation
from federated_learning.privacy.secure_aggregation import FixedPointCodec

INSTALL_HINT = "pip install 'federated-learning[he]'"
DEFAULT_KEY_BITS = 2048
MIN_KEY_BITS = 1024
DEFAULT_MAX_AGENTS = 128
MAX_SLOT_BITS = 62
"""Slot sums are unpacked into int64; 62 bits leave room for the offset subtraction."""


class HomomorphicUnavailable(PrivacyError, ImportError):
    """The optional ``phe`` package (python-paillier) is not installed."""

    def __init__(self) -> None:
        super().__init__(
            f"homomorphic aggregation needs the 'phe' package; install it with {INSTALL_HINT}"
        )


class ForeignPublicKey(ProtocolViolation):
    """A ciphertext was made under another Paillier public key than the session's."""


class TooManyAgents(PrivacyError):
    """More agents than the slot width can sum without carrying into the next slot."""

    def __init__(self, num_agents: int, max_agents: int, slot_bits: int) -> None:
        self.num_agents = num_agents
        self.max_agents = max_agents
        super().__init__(
            f"a {slot_bits}-bit Paillier slot holds the sum of at most {max_agents} agents; "
            f"got {num_agents} (raise HEConfig.max_agents)"
        )


def _paillier() -> Any:
    """The ``phe.paillier`` module, imported on first use."""
    try:
        from phe import paillier
    except ImportError as error:
        raise HomomorphicUnavailable() from error
    return paillier


def phe_available() -> bool:
    """Whether ``phe`` imports (tests and scripts skip homomorphic work without it)."""
    try:
        _paillier()
    except HomomorphicUnavailable:
        return False
    return True


@dataclass(frozen=True)
class HEPublicKey:
    """A Paillier public key n (g = n + 1); safe to give to agents and the aggregator."""

    n: int

    def __post_init__(self) -> None:
        if self.n.bit_length() < MIN_KEY_BITS or self.n % 2 == 0:
            raise ValueError(
                f"Paillier modulus must be odd with >= {MIN_KEY_BITS} bits; "
                f"got {self.n.bit_length()} bits")

    @property
    def bits(self) -> int:
        return self.n.bit_length()

    @property
    def nsquare(self) -> int:
        return self.n * self.n

    @property
    def ciphertext_bytes(self) -> int:
        """Bytes of one serialised ciphertext (an integer modulo n**2)."""
        return (self.nsquare.bit_length() + 7) // 8

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of SHA-256 over n, to name the key in messages and logs."""
        return hashlib.sha256(self.n.to_bytes((self.bits + 7) // 8, "big")).hexdigest()[:16]

    @cached_property
    def _phe_key(self) -> Any:
        return _paillier().PaillierPublicKey(self.n)

    def encrypt(self, plaintext: int) -> int:
        """E(m) = (1 + n m) r**n mod n**2 with r from the OS CSPRNG; 0 <= plaintext < n."""
        if not 0 <= plaintext < self.n:
            raise ValueError(f"Paillier plaintext must be in [0, n); got {plaintext.bit_length()} bits")
        return int(self._phe_key.raw_encrypt(plaintext))


@dataclass(frozen=True)
class HEConfig:
    """What agents, aggregator and key holder agree on for one aggregation.

    weight_normaliser is the largest num_examples any agent may report: each agent
    encrypts delta * num_examples / weight_normaliser, a weight in (0, 1].
    """

    public_key: HEPublicKey
    vector_length: int
    codec: FixedPointCodec = field(default_factory=FixedPointCodec)
    max_agents: int = DEFAULT_MAX_AGENTS
    pack: bool = True
    weight_normaliser: float = 1.0
    min_agents: int = 1

    def __post_init__(self) -> None:
        if self.vector_length < 1:
            raise ValueError(f"vector length must be >= 1; got {self.vector_length}")
        if not 1 <= self.min_agents <= self.max_agents:
            raise ValueError(f"need 1 <= min_agents <= max_agents; got {self.min_agents}, "
                             f"{self.max_agents}")
        if not (self.weight_normaliser > 0 and math.isfinite(self.weight_normaliser)):
            raise ValueError(f"weight normaliser must be finite and > 0; got {self.weight_normaliser}")
        if self.slot_bits > min(MAX_SLOT_BITS, self.public_key.bits - 1):
            raise ValueError(
                f"a slot for {self.max_agents} agents needs {self.slot_bits} bits; the limit is "
                f"{min(MAX_SLOT_BITS, self.public_key.bits - 1)} (lower max_agents or the scale)")

    @property
    def offset(self) -> int:
        """M = round(clip_range * scale), added to every code to make it non-negative."""
        return max(1, round(self.codec.clip_range * self.codec.scale))

    @property
    def slot_bits(self) -> int:
        """b = bit_length(2 M max_agents): a slot sum of max_agents codes is < 2**b."""
        return (2 * self.offset * self.max_agents).bit_length()

    @property
    def slots_per_ciphertext(self) -> int:
        """s = floor((bits(n) - 1) / b) when packing, else 1."""
        return (self.public_key.bits - 1) // self.slot_bits if self.pack else 1

    @property
    def num_ciphertexts(self) -> int:
        return math.ceil(self.vector_length / self.slots_per_ciphertext)


@dataclass(frozen=True)
class EncryptedVector:
    """Agent -> aggregator: one encrypted (weighted) update and its example count."""

    agent_id: str
    public_key: HEPublicKey
    ciphertexts: tuple[int, ...]
    num_examples: int

    @property
    def nbytes(self) -> int:
        """Serialised ciphertext bytes (the upload, without agent id and key)."""
        return len(self.ciphertexts) * self.public_key.ciphertext_bytes


@dataclass(frozen=True)
class EncryptedAggregate:
    """Aggregator -> key holder: the product of all uploads (= encryption of their sum)."""

    public_key: HEPublicKey
    ciphertexts: tuple[int, ...]
    agent_ids: tuple[str, ...]
    total_examples: int

    @property
    def num_agents(self) -> int:
        return len(self.agent_ids)


def finite_vector(config: HEConfig, values: NDArray[np.floating]) -> NDArray[np.float64]:
    """The flat float64 vector, after checking its length and that every value is finite."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size != config.vector_length:
        raise ValueError(f"update has {flat.size} values; the session expects "
                         f"{config.vector_length}")
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"update has {int(np.sum(~np.isfinite(flat)))} NaN or infinite values")
    return flat


def offset_codes(config: HEConfig, values: NDArray[np.float64]) -> NDArray[np.int64]:
    """q + M with q = round(clip(x, -R, R) * scale): int64 codes in [0, 2M]."""
    signed = config.codec.encode(values).view(np.int32).astype(np.int64)
    result: NDArray[np.int64] = signed + config.offset
    return result


def pack_slots(codes: NDArray[np.int64], slot_bits: int, slots: int) -> list[int]:
    """Plaintext i = sum_j codes[i s + j] * 2**(j b), for b = slot_bits and s = slots."""
    plaintexts = []
    for start in range(0, codes.size, slots):
        packed = 0
        for code in reversed(codes[start:start + slots].tolist()):
            packed = (packed << slot_bits) | code
        plaintexts.append(packed)
    return plaintexts


def unpack_slots(plaintexts: list[int], slot_bits: int, slots: int,
                 length: int) -> NDArray[np.int64]:
    """Inverse of `pack_slots`: the first `length` b-bit slots, lowest bits first."""
    mask = (1 << slot_bits) - 1
    values = [(packed >> (j * slot_bits)) & mask for packed in plaintexts for j in range(slots)]
    return np.array(values[:length], dtype=np.int64)


def encrypt_vector(config: HEConfig, agent_id: str, values: NDArray[np.floating],
                   num_examples: int = 1) -> EncryptedVector:
    """Clip, encode, pack and encrypt a flat float vector as it is (no weighting)."""
    codes = offset_codes(config, finite_vector(config, values))
    plaintexts = pack_slots(codes, config.slot_bits, config.slots_per_ciphertext)
    ciphertexts = tuple(config.public_key.encrypt(m) for m in plaintexts)
    return EncryptedVector(agent_id, config.public_key, ciphertexts, num_examples)


def encrypt_update(config: HEConfig, agent_id: str, delta: NDArray[np.floating],
                   num_examples: int) -> EncryptedVector:
    """Encrypt delta * num_examples / weight_normaliser (FedAvg's weighted term).

    The codec clips each weighted coordinate to [-R, R]; clip the delta's L2 norm to
    C <= R first (`mechanisms.clip_l2`) so that clipping here never bites.
    """
    if not 1 <= num_examples <= config.weight_normaliser:
        raise ValueError(f"num_examples must be in [1, weight_normaliser = "
                         f"{config.weight_normaliser:g}]; got {num_examples}")
    weighted = finite_vector(config, delta) * (num_examples / config.weight_normaliser)
    return encrypt_vector(config, agent_id, weighted, num_examples)


def add_ciphertexts(total: list[int], ciphertexts: tuple[int, ...], nsquare: int) -> None:
    """total[i] <- total[i] * c[i] mod n**2, i.e. E(a) E(b) = E(a + b), in place."""
    for index, ciphertext in enumerate(ciphertexts):
        total[index] = total[index] * ciphertext % nsquare


class HEAggregator:
    """Sums encrypted uploads under the session's public key; cannot decrypt anything."""

    def __init__(self, config: HEConfig) -> None:
        self.config = config
        self._total: list[int] = []
        self._agents: list[str] = []
        self._examples = 0

    def submit(self, vector: EncryptedVector) -> None:
        """Check one upload (key, length, ciphertext range, capacity) and add it to the sum.

        Raises:
            ForeignPublicKey: the upload names another public key.
            ProtocolViolation: a repeated agent, a wrong ciphertext count or a value that is
                no ciphertext (outside (0, n**2) or a multiple of n).
            TooManyAgents: the sum already holds max_agents uploads.
        """
        self._check(vector)
        if not self._total:
            self._total = list(vector.ciphertexts)
        else:
            add_ciphertexts(self._total, vector.ciphertexts, self.config.public_key.nsquare)
        self._agents.append(vector.agent_id)
        self._examples += vector.num_examples

    def aggregate(self) -> EncryptedAggregate:
        """The encrypted sum of all uploads so far, for the key holder."""
        if len(self._agents) < self.config.min_agents:
            raise ProtocolViolation(f"aggregate needs at least {self.config.min_agents} uploads; "
                                    f"got {len(self._agents)}")
        return EncryptedAggregate(self.config.public_key, tuple(self._total),
                                  tuple(self._agents), self._examples)

    def _check(self, vector: EncryptedVector) -> None:
        key = self.config.public_key
        if vector.public_key != key:
            raise ForeignPublicKey(
                f"upload of '{vector.agent_id}' is under key {vector.public_key.fingerprint}; "
                f"the session's key is {key.fingerprint}")
        if vector.agent_id in self._agents:
            raise ProtocolViolation(f"agent '{vector.agent_id}' uploaded twice")
        if len(self._agents) >= self.config.max_agents:
            raise TooManyAgents(len(self._agents) + 1, self.config.max_agents,
                                self.config.slot_bits)
        if len(vector.ciphertexts) != self.config.num_ciphertexts:
            raise ProtocolViolation(
                f"upload of '{vector.agent_id}' has {len(vector.ciphertexts)} ciphertexts; "
                f"the session expects {self.config.num_ciphertexts}")
        if vector.num_examples < 1:
            raise ProtocolViolation(f"upload of '{vector.agent_id}' reports "
                                    f"{vector.num_examples} examples")
        nsquare, n = key.nsquare, key.n
        if any(not 0 < c < nsquare or c % n == 0 for c in vector.ciphertexts):
            raise ProtocolViolation(f"upload of '{vector.agent_id}' holds a value that is not a "
                                    f"ciphertext modulo n**2")


class KeyHolder:
    """Holds the Paillier private key and decrypts aggregates only; never the aggregator."""

    def __init__(self, public_key: HEPublicKey, private_key: Any) -> None:
        self.public_key = public_key
        self._private_key = private_key

    @classmethod
    def generate(cls, key_bits: int = DEFAULT_KEY_BITS) -> KeyHolder:
        """A fresh key pair with a key_bits-bit modulus n (2048 for use; 1024 for tests)."""
        if key_bits < MIN_KEY_BITS:
            raise ValueError(f"Paillier key size must be >= {MIN_KEY_BITS} bits; got {key_bits}")
        public, private = _paillier().generate_paillier_keypair(n_length=key_bits)
        return cls(HEPublicKey(int(public.n)), private)

    def decrypt_sum(self, config: HEConfig, aggregate: EncryptedAggregate) -> NDArray[np.float64]:
        """Float64 sum of the aggregated (weighted) vectors, length config.vector_length.

        Raises:
            ForeignPublicKey: the aggregate or the config is under another key.
            TooManyAgents: more agents than the slot width allows.
            ProtocolViolation: fewer than min_agents agents, or a wrong ciphertext count.
        """
        self._check(config, aggregate)
        plaintexts = [int(self._private_key.raw_decrypt(c)) for c in aggregate.ciphertexts]
        slots = unpack_slots(plaintexts, config.slot_bits, config.slots_per_ciphertext,
                             config.vector_length)
        signed = slots - aggregate.num_agents * config.offset
        decoded: NDArray[np.float64] = signed.astype(np.float64) / config.codec.scale
        return decoded

    def decrypt_mean(self, config: HEConfig, aggregate: EncryptedAggregate) -> NDArray[np.float64]:
        """FedAvg's example-weighted mean: sum * weight_normaliser / total examples."""
        mean: NDArray[np.float64] = (self.decrypt_sum(config, aggregate)
                                     * (config.weight_normaliser / aggregate.total_examples))
        return mean

    def _check(self, config: HEConfig, aggregate: EncryptedAggregate) -> None:
        for name, key in (("config", config.public_key), ("aggregate", aggregate.public_key)):
            if key != self.public_key:
                raise ForeignPublicKey(f"{name} is under key {key.fingerprint}; this key holder "
                                       f"holds {self.public_key.fingerprint}")
        if aggregate.num_agents > config.max_agents:
            raise TooManyAgents(aggregate.num_agents, config.max_agents, config.slot_bits)
        if aggregate.num_agents < config.min_agents:
            raise ProtocolViolation(
                f"refusing to decrypt an aggregate of {aggregate.num_agents} agents; "
                f"min_agents is {config.min_agents}")
        if len(aggregate.ciphertexts) != config.num_ciphertexts:
            raise ProtocolViolation(f"aggregate has {len(aggregate.ciphertexts)} ciphertexts; "
                                    f"the session expects {config.num_ciphertexts}")
