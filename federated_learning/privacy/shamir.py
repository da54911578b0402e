"""Shamir secret sharing over the prime field of p = 2**521 - 1, with Python integers.

Shamir, "How to Share a Secret", Communications of the ACM 22(11), 1979: a secret s is the
constant term of a random polynomial f of degree t - 1 over GF(p); share k is (k, f(k)).
Any t shares determine f, hence s = f(0) by Lagrange interpolation; any t - 1 shares are
consistent with every secret, so they reveal nothing about it. The Mersenne prime
2**521 - 1 exceeds every 256-bit secret (X25519 keys, 32-byte seeds).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

SHAMIR_PRIME = 2**521 - 1
"""The field modulus p, the Mersenne prime 2**521 - 1."""


@dataclass(frozen=True)
class Share:
    """One Shamir share (x, y = f(x) mod SHAMIR_PRIME)."""

    x: int
    y: int


def shamir_split(secret: int, num_shares: int, threshold: int) -> list[Share]:
    """Split secret into num_shares shares at x = 1..num_shares; any threshold rebuild it.

    f(x) = secret + a_1 x + ... + a_{t-1} x^(t-1) mod p with a_i uniform from `secrets`
    (Shamir, "How to Share a Secret", CACM 1979); fewer than t shares reveal nothing.
    """
    if not 0 <= secret < SHAMIR_PRIME:
        raise ValueError(f"secret must be in [0, 2**521 - 1); got {secret.bit_length()} bits")
    if not 1 <= threshold <= num_shares:
        raise ValueError(
            f"threshold must be in [1, num_shares={num_shares}]; got {threshold}"
        )
    coefficients = [secret] + [secrets.randbelow(SHAMIR_PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num_shares + 1):
        y = 0
        for coefficient in reversed(coefficients):
            y = (y * x + coefficient) % SHAMIR_PRIME
        shares.append(Share(x, y))
    return shares


def lagrange_coefficients_at_zero(xs: Sequence[int]) -> list[int]:
    """lambda_i = prod_{j != i} x_j / (x_j - x_i) mod p, so f(0) = sum_i lambda_i f(x_i)."""
    if len(set(xs)) != len(xs):
        raise ValueError(f"share x-coordinates must be distinct; got {sorted(xs)}")
    if any(not 0 < x < SHAMIR_PRIME for x in xs):
        raise ValueError("share x-coordinates must be in [1, p)")
    coefficients = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * xj % SHAMIR_PRIME
                denominator = denominator * (xj - xi) % SHAMIR_PRIME
        coefficients.append(numerator * pow(denominator, -1, SHAMIR_PRIME) % SHAMIR_PRIME)
    return coefficients


def shamir_combine(shares: Sequence[Share]) -> int:
    """The secret f(0) interpolated from shares; needs at least the threshold many."""
    if not shares:
        raise ValueError("need at least one share")
    weights = lagrange_coefficients_at_zero([share.x for share in shares])
    return sum(w * share.y for w, share in zip(weights, shares, strict=True)) % SHAMIR_PRIME
