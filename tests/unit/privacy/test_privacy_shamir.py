"""Shamir secret sharing over GF(2**521 - 1)."""

from __future__ import annotations

import itertools
import secrets

import pytest

from federated_learning.privacy.shamir import (
    SHAMIR_PRIME,
    Share,
    lagrange_coefficients_at_zero,
    shamir_combine,
    shamir_split,
)


def test_prime_is_the_mersenne_prime_and_holds_256_bit_secrets() -> None:
    assert SHAMIR_PRIME == 2**521 - 1
    assert pow(3, SHAMIR_PRIME - 1, SHAMIR_PRIME) == 1
    assert SHAMIR_PRIME > 2**256


def test_any_threshold_shares_rebuild_the_secret() -> None:
    secret = secrets.randbits(256)

    shares = shamir_split(secret, num_shares=6, threshold=3)

    for subset in itertools.combinations(shares, 3):
        assert shamir_combine(subset) == secret
    assert shamir_combine(shares) == secret


def test_fewer_than_threshold_shares_do_not_rebuild_the_secret() -> None:
    secret = secrets.randbits(256)

    shares = shamir_split(secret, num_shares=5, threshold=4)

    assert shamir_combine(shares[:3]) != secret


def test_shares_are_points_at_one_to_n() -> None:
    shares = shamir_split(42, num_shares=4, threshold=1)

    assert shares == [Share(x, 42) for x in (1, 2, 3, 4)]


def test_lagrange_weights_of_a_line_by_hand() -> None:
    # f(x) = 5 + 2x: f(1) = 7, f(2) = 9; f(0) = 2*7 - 1*9.
    assert lagrange_coefficients_at_zero([1, 2]) == [2, SHAMIR_PRIME - 1]
    assert shamir_combine([Share(1, 7), Share(2, 9)]) == 5


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="threshold must be in \\[1, num_shares=3\\]; got 4"):
        shamir_split(1, 3, 4)
    with pytest.raises(ValueError, match="secret must be in"):
        shamir_split(SHAMIR_PRIME, 3, 2)
    with pytest.raises(ValueError, match="must be distinct"):
        shamir_combine([Share(1, 2), Share(1, 3)])
