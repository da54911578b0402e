"""Roles, permissions, API-key hashing and organisation-scoped training ids (pure)."""

from __future__ import annotations

import fnmatch

import pytest

from federated_learning.access import (
    DEFAULT_ORG,
    SUPER_ADMIN,
    Permission,
    Principal,
    Role,
    api_key_id,
    check_slug,
    hash_api_key,
    is_expired,
    key_matches,
    new_api_key,
    org_of_training,
    redis_acl_key_pattern,
    training_id_for,
)
from federated_learning.protocol.keys import Keys


def principal(role: Role, org: str = "acme") -> Principal:
    return Principal(key_id="0123456789ab", name="alice", role=role, org_id=org)


@pytest.mark.parametrize(("role", "granted"), [
    (Role.VIEWER, {Permission.READ}),
    (Role.OPERATOR, {Permission.READ, Permission.CONTROL}),
    (Role.ADMIN, {Permission.READ, Permission.CONTROL, Permission.MANAGE}),
])
def test_each_role_holds_exactly_its_permissions(role: Role, granted: set[Permission]) -> None:
    assert {p for p in Permission if principal(role).allows(p)} == granted


def test_only_the_bootstrap_key_creates_organisations_and_crosses_them() -> None:
    assert SUPER_ADMIN.allows(Permission.CREATE_ORG) and SUPER_ADMIN.may_access("anything")
    admin = principal(Role.ADMIN)
    assert not admin.allows(Permission.CREATE_ORG)
    assert admin.may_access("acme") and not admin.may_access("globex") and not admin.may_access(DEFAULT_ORG)


def test_a_new_key_verifies_and_names_its_id_while_others_do_not() -> None:
    key, key_id = new_api_key()
    stored = hash_api_key(key)
    assert api_key_id(key) == key_id and len(key_id) == 12
    assert key not in stored and len(stored) == 64
    assert key_matches(key, stored)
    assert not key_matches(key + "x", stored)
    other, _ = new_api_key()
    assert not key_matches(other, stored)


@pytest.mark.parametrize("key", ["", "test-key-0123456789abcdef", "flk_short_secret", "flk_0123456789ab_",
                                 "flk_0123456789AB_secret", "xyz_0123456789ab_secret"])
def test_malformed_keys_have_no_id(key: str) -> None:
    assert api_key_id(key) is None


def test_secret_may_contain_underscores() -> None:
    assert api_key_id("flk_0123456789ab_se_cr_et") == "0123456789ab"


def test_expiry() -> None:
    assert not is_expired(None)
    assert is_expired(100.0, now=100.0) and is_expired(100.0, now=101.0)
    assert not is_expired(100.0, now=99.0)


def test_training_ids_of_an_organisation_carry_it() -> None:
    assert training_id_for("acme", None, "3f2a9c") == "acme.3f2a9c"
    assert training_id_for("acme", "vision-1", "r") == "acme.vision-1"
    assert training_id_for("acme", "acme.vision-1", "r") == "acme.vision-1"
    assert org_of_training("acme.vision-1") == "acme"


def test_a_name_cannot_move_a_training_into_another_organisation() -> None:
    with pytest.raises(ValueError, match="invalid"):
        training_id_for("acme", "globex.x", "r")
    with pytest.raises(ValueError, match="reserved"):
        training_id_for(DEFAULT_ORG, "acme.x", "r")


def test_default_organisation_keeps_plain_ids() -> None:
    assert training_id_for(DEFAULT_ORG, "abc", "r") == "abc"
    assert training_id_for(DEFAULT_ORG, None, "r") == "r"
    assert org_of_training("abc") == DEFAULT_ORG


def test_acl_pattern_covers_the_organisations_training_keys_only() -> None:
    keys = Keys("fl")
    pattern = redis_acl_key_pattern("fl", "acme")
    assert pattern == "fl:*{t:acme.*}*"
    ours = [keys.training("acme.x"), keys.round_updates("acme.x", 3), keys.versions("acme.x")]
    theirs = [keys.training("globex.x"), keys.training("acmex"), keys.trainings]
    assert all(_glob(pattern, key) for key in ours)
    assert not any(_glob(pattern, key) for key in theirs)


@pytest.mark.parametrize("value", ["acme", "a", "acme-2", "0rg"])
def test_valid_slugs(value: str) -> None:
    assert check_slug("organisation", value) == value


@pytest.mark.parametrize("value", ["", "Acme", "ac.me", "-acme", "a" * 33, "ac_me"])
def test_invalid_slugs_name_the_value(value: str) -> None:
    with pytest.raises(ValueError, match="organisation id"):
        check_slug("organisation", value)


def _glob(pattern: str, key: str) -> bool:
    """Redis glob for the '*'-only patterns used here ('{' and '}' are literal in Redis globs)."""
    return fnmatch.fnmatchcase(key, pattern)
