"""Who may do what: roles and their permissions, API-key hashing, organisation-scoped training ids.

Pure functions and values only (no Redis, no FastAPI): the dashboard's dependencies and the
key store call them, and the unit tests exercise them directly.

- An API key is ``flk_<key_id>_<secret>``: ``key_id`` (12 hex digits) names the key in
  listings and revocations, ``secret`` is 32 random bytes. Only the SHA-256 of the whole key
  is stored; a presented key is hashed and compared in constant time.
- A training of organisation ``acme`` has the id ``acme.<name>``, so every per-training key
  (hash tag ``{t:acme.<name>}``) matches ``<prefix>:*{t:acme.*}*`` and a Redis ACL rule can
  confine to it. Trainings of the implicit ``default`` organisation keep plain ids (no dot).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_ORG = "default"
DEFAULT_PROJECT = "default"
KEY_PREFIX = "flk"
KEY_ID_HEX = 12
KEY_SECRET_BYTES = 32
BOOTSTRAP_KEY_ID = "bootstrap"
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
"""Organisation and project ids: lower-case letters, digits and '-', at most 32; never a dot."""
TRAINING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,94}$")


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


class Permission(StrEnum):
    READ = "read"
    """Read endpoints and the WebSocket."""
    CONTROL = "control"
    """Start, stop, roll back trainings; acknowledge alerts; issue join tokens; HTTP sync."""
    MANAGE = "manage"
    """Projects and API keys of the organisation."""
    CREATE_ORG = "create_org"
    """Create organisations: only the deployment's bootstrap key."""


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.OPERATOR: frozenset({Permission.READ, Permission.CONTROL}),
    Role.ADMIN: frozenset({Permission.READ, Permission.CONTROL, Permission.MANAGE}),
}


@dataclass(frozen=True)
class Principal:
    """The holder of a verified key: an organisation and a role, or the super-admin (``org_id`` None)."""

    key_id: str
    name: str
    role: Role
    org_id: str | None

    @property
    def is_super(self) -> bool:
        return self.org_id is None

    def allows(self, permission: Permission) -> bool:
        """Whether the role grants ``permission`` (the super-admin holds every permission)."""
        return self.is_super or permission in ROLE_PERMISSIONS[self.role]

    def may_access(self, org_id: str) -> bool:
        """Whether the key may see or act on resources of organisation ``org_id``."""
        return self.is_super or self.org_id == org_id


SUPER_ADMIN = Principal(key_id=BOOTSTRAP_KEY_ID, name="deployment", role=Role.ADMIN, org_id=None)


def check_slug(kind: str, value: str) -> str:
    """``value`` when it is a valid organisation or project id; else ValueError naming it."""
    if not SLUG.fullmatch(value):
        raise ValueError(f"{kind} id '{value}' is invalid; use 1-32 of a-z, 0-9 and '-', starting "
                         "with a letter or digit")
    return value


def new_api_key() -> tuple[str, str]:
    """A fresh key ``flk_<key_id>_<secret>`` and its ``key_id``."""
    key_id = secrets.token_hex(KEY_ID_HEX // 2)
    return f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(KEY_SECRET_BYTES)}", key_id


def hash_api_key(key: str) -> str:
    """SHA-256 (hex) of the whole key: enough for a 256-bit random secret, no salt or stretching needed."""
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_id(key: str) -> str | None:
    """The ``key_id`` of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != KEY_ID_HEX or not parts[2]:
        return None
    if any(c not in "0123456789abcdef" for c in parts[1]):
        return None
    return parts[1]


def key_matches(key: str, stored_hash: str) -> bool:
    """Whether ``key`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_api_key(key).encode(), stored_hash.encode())


def is_expired(expires_at: float | None, now: float | None = None) -> bool:
    """Whether an expiry time (unix seconds; None: never) has passed."""
    return expires_at is not None and (time.time() if now is None else now) >= expires_at


def training_id_for(org_id: str, requested: str | None, random_part: str) -> str:
    """The id of a new training of ``org_id``: ``<org>.<name>``, or the bare name in the default org.

    ``requested`` is the caller's name (already prefixed with ``<org>.`` or not); ``random_part``
    is used when there is none. Raises ValueError for a name that would fall under another
    organisation's pattern.
    """
    name = requested or random_part
    if org_id == DEFAULT_ORG:
        if "." in name:
            raise ValueError(f"training id '{name}' contains '.', which is reserved for "
                             "organisation prefixes (<org>.<name>)")
        return name
    name = name.removeprefix(f"{org_id}.")
    if not TRAINING_NAME.fullmatch(name):
        raise ValueError(f"training name '{name}' is invalid; use up to 95 of A-Z, a-z, 0-9, '_' and '-' "
                         f"(the id becomes '{org_id}.<name>')")
    return f"{org_id}.{name}"


def org_of_training(training_id: str) -> str:
    """The organisation a training id belongs to (the part before the first dot; default without one)."""
    org, dot, _name = training_id.partition(".")
    return org if dot else DEFAULT_ORG


def redis_acl_key_pattern(prefix: str, org_id: str) -> str:
    """The ACL key pattern (``%R~`` / ``~`` argument) that covers every per-training key of ``org_id``."""
    return f"{prefix}:*{{t:{org_id}.*}}*"
