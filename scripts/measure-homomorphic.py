#!/usr/bin/env python
"""Measure the cost of Paillier homomorphic aggregation (optional extra 'he') on small models.

For each vector length d (--dims) and agent count K (--agents), with one --key-bits key:
- per-agent encryption time (weight, clip, encode, pack, encrypt one update);
- aggregation time (the aggregator checks and multiplies all K uploads);
- decryption time (the key holder decrypts the sum and decodes the weighted mean);
- upload bytes: ciphertext bytes per agent vs float32 plaintext bytes (4 d);
- max |error| of the decrypted weighted mean against the float64 weighted mean.

Packed rows are measured in full except that only --encrypt-agents distinct agents encrypt
(their mean time is the per-agent figure); the other K - m uploads reuse those ciphertexts
under new agent ids, which costs the aggregator and key holder exactly as much as fresh
ones (it multiplies and decrypts the same number of ciphertexts of the same size).
Unpacked rows (one value per ciphertext) are measured on --unpacked-sample values and
scaled linearly by d / sample (every cost is per ciphertext); they say "extrapolated".

With --secagg (default on) the same K and d also run the pairwise-masking secure
aggregation of `secure_aggregation.measure_secagg_cost` (no dropouts) for comparison.

Usage:
    .venv/bin/python scripts/measure-homomorphic.py [--dims 650 10000] [--agents 10 69] \
        [--key-bits 2048] [--encrypt-agents 2] [--unpacked-sample 64] [--no-secagg] \
        [--json reports/homomorphic.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import HelpFormatter, use_venv

use_venv("phe", extras="he")

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from federated_learning.privacy.homomorphic import (
    EncryptedVector,
    HEAggregator,
    HEConfig,
    KeyHolder,
    encrypt_update,
    phe_available,
)
from federated_learning.privacy.secure_aggregation import (
    KEY_BYTES,
    FixedPointCodec,
    ShareBundle,
    encrypt_share,
    measure_secagg_cost,
)
from federated_learning.privacy.shamir import shamir_split

WEIGHT_NORMALISER = 100.0


@dataclass(frozen=True)
class HECost:
    """One measured (or extrapolated) configuration; times in seconds."""

    scheme: str
    vector_length: int
    num_agents: int
    distinct_encryptions: int
    ciphertexts_per_agent: int
    slots_per_ciphertext: int
    encrypt_seconds_per_agent: float
    aggregate_seconds: float
    decrypt_seconds: float
    upload_bytes_per_agent: int
    plaintext_bytes_per_agent: int
    max_abs_error: float
    extrapolated_from: int | None = None


def _updates(num_agents: int, dim: int, seed: int) -> tuple[list[NDArray[np.float64]], list[int]]:
    rng = np.random.default_rng(seed)
    updates = [rng.uniform(-1.0, 1.0, dim) for _ in range(num_agents)]
    examples = [int(n) for n in rng.integers(1, int(WEIGHT_NORMALISER) + 1, num_agents)]
    return updates, examples


def _timed_encryptions(config: HEConfig, updates: list[NDArray[np.float64]],
                       examples: list[int]) -> tuple[list[EncryptedVector], float]:
    started = time.perf_counter()
    vectors = [encrypt_update(config, f"agent-{i:03d}", u, n)
               for i, (u, n) in enumerate(zip(updates, examples, strict=True))]
    return vectors, (time.perf_counter() - started) / len(vectors)


def measure_he(holder: KeyHolder, dim: int, num_agents: int, pack: bool, distinct: int,
               seed: int = 0) -> HECost:
    """One full round: m distinct encryptions, K uploads, aggregation, decryption."""
    config = HEConfig(holder.public_key, dim, FixedPointCodec(2.0**16, 1.0), max_agents=num_agents,
                      pack=pack, weight_normaliser=WEIGHT_NORMALISER)
    distinct = min(distinct, num_agents)
    updates, examples = _updates(distinct, dim, seed)
    encrypted, encrypt_seconds = _timed_encryptions(config, updates, examples)
    uploads = [dataclasses.replace(encrypted[k % distinct], agent_id=f"agent-{k:03d}")
               for k in range(num_agents)]
    started = time.perf_counter()
    aggregator = HEAggregator(config)
    for upload in uploads:
        aggregator.submit(upload)
    aggregate = aggregator.aggregate()
    aggregate_seconds = time.perf_counter() - started
    started = time.perf_counter()
    mean = holder.decrypt_mean(config, aggregate)
    decrypt_seconds = time.perf_counter() - started
    weights = [examples[k % distinct] for k in range(num_agents)]
    expected = np.average([updates[k % distinct] for k in range(num_agents)], axis=0,
                          weights=weights)
    return HECost("paillier packed" if pack else "paillier 1/ct", dim, num_agents, distinct,
                  config.num_ciphertexts, config.slots_per_ciphertext, encrypt_seconds,
                  aggregate_seconds, decrypt_seconds, uploads[0].nbytes, 4 * dim,
                  float(np.max(np.abs(mean - expected))))


def scaled(cost: HECost, dim: int) -> HECost:
    """The cost of `cost`'s scheme at length dim, scaled by dim / measured length."""
    factor = dim / cost.vector_length
    return dataclasses.replace(
        cost, vector_length=dim, ciphertexts_per_agent=round(cost.ciphertexts_per_agent * factor),
        encrypt_seconds_per_agent=cost.encrypt_seconds_per_agent * factor,
        aggregate_seconds=cost.aggregate_seconds * factor,
        decrypt_seconds=cost.decrypt_seconds * factor,
        upload_bytes_per_agent=round(cost.upload_bytes_per_agent * factor),
        plaintext_bytes_per_agent=4 * dim, extrapolated_from=cost.vector_length)


def sealed_share_bytes(num_agents: int) -> int:
    """Bytes of one AES-GCM sealed share bundle (nonce + ciphertext) for num_agents members."""
    secret = int.from_bytes(os.urandom(KEY_BYTES), "big")
    mask_share, self_share = (shamir_split(secret, num_agents, 2)[-1] for _ in range(2))
    sealed = encrypt_share(ShareBundle("agent-000", "agent-001", mask_share, self_share),
                           os.urandom(KEY_BYTES), os.urandom(16))
    return len(sealed.nonce) + len(sealed.ciphertext)


def measure_secagg(dim: int, num_agents: int) -> HECost:
    """Pairwise masking, no dropouts: share + mask time per agent, server unmask time.

    Upload bytes: two X25519 public keys, K - 1 sealed share bundles and the uint32 vector.
    """
    cost = measure_secagg_cost(num_agents=num_agents, vector_length=dim, dropouts=(0,))[0]
    upload = 2 * KEY_BYTES + (num_agents - 1) * sealed_share_bytes(num_agents) + 4 * dim
    return HECost("pairwise masking", dim, num_agents, num_agents, 0, 0,
                  cost.client_share_seconds + cost.client_mask_seconds, 0.0,
                  cost.server_unmask_seconds, upload, 4 * dim, cost.max_abs_error)


def _print_table(key_bits: int, keygen_seconds: float, rows: list[HECost]) -> None:
    print(f"== homomorphic aggregation cost: {key_bits}-bit Paillier key "
          f"(key generation {keygen_seconds:.2f} s), fixed point 2**16, clip range 1 ==")
    print(f"{'scheme':<17} {'d':>6} {'K':>3} {'enc':>4} {'ct/agent':>8} {'slots':>5} "
          f"{'encrypt s/agent':>15} {'aggregate s':>11} {'decrypt s':>9} {'upload B':>10} "
          f"{'float32 B':>9} {'ratio':>7} {'max err':>8}  note")
    for r in rows:
        note = f"extrapolated from d={r.extrapolated_from}" if r.extrapolated_from else ""
        if r.scheme == "pairwise masking":
            note = "encrypt = share+mask; decrypt = unmask"
        print(f"{r.scheme:<17} {r.vector_length:6d} {r.num_agents:3d} "
              f"{r.distinct_encryptions:4d} {r.ciphertexts_per_agent:8d} "
              f"{r.slots_per_ciphertext:5d} {r.encrypt_seconds_per_agent:15.3g} "
              f"{r.aggregate_seconds:11.3g} {r.decrypt_seconds:9.3g} "
              f"{r.upload_bytes_per_agent:10d} {r.plaintext_bytes_per_agent:9d} "
              f"{r.upload_bytes_per_agent / r.plaintext_bytes_per_agent:7.1f} "
              f"{r.max_abs_error:8.1e}  {note}")


def _rows(holder: KeyHolder, args: argparse.Namespace) -> list[HECost]:
    rows: list[HECost] = []
    for num_agents in args.agents:
        unpacked = (measure_he(holder, args.unpacked_sample, num_agents, False,
                               args.encrypt_agents) if args.unpacked_sample else None)
        for dim in args.dims:
            rows.append(measure_he(holder, dim, num_agents, True, args.encrypt_agents))
            if unpacked is not None:
                rows.append(scaled(unpacked, dim))
            if args.secagg:
                rows.append(measure_secagg(dim, num_agents))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[650, 10_000],
                        help="model sizes (parameters) to measure")
    parser.add_argument("--agents", type=int, nargs="+", default=[10, 69],
                        help="agent counts to measure")
    parser.add_argument("--key-bits", type=int, default=2048, help="Paillier key size")
    parser.add_argument("--encrypt-agents", type=int, default=2,
                        help="distinct agents that encrypt (timed); the rest reuse uploads")
    parser.add_argument("--unpacked-sample", type=int, default=64,
                        help="values measured one per ciphertext, scaled to d (0: skip)")
    parser.add_argument("--no-secagg", dest="secagg", action="store_false",
                        help="skip the pairwise-masking comparison")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    if not phe_available():
        print("phe is not installed: pip install 'federated-learning[he]'", file=sys.stderr)
        return 2
    started = time.perf_counter()
    holder = KeyHolder.generate(args.key_bits)
    keygen_seconds = time.perf_counter() - started
    rows = _rows(holder, args)
    _print_table(args.key_bits, keygen_seconds, rows)
    print(f"cpu: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"gmpy2: {_has_gmpy2()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"key_bits": args.key_bits,
                                         "keygen_seconds": keygen_seconds,
                                         "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    return 0


def _has_gmpy2() -> bool:
    try:
        import gmpy2  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
