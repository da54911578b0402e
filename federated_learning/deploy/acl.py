"""Redis ACL users, one per role: what each may run, on which keys; provisioning; their secrets.

- ``<prefix>-services``: every key of the deployment; every command but admin and
  dangerous ones (INFO excepted: the monitor reads memory use).
- ``<prefix>-dashboard`` (the HTTP gateway): reads every key of the deployment; writes only
  the keys :meth:`Keys.dashboard_write_keys` names.
- ``<prefix>-agent-<id>``: XADD to the agent and update streams; its own inbox
  (create the group, read, ack, claim); GET/SET on blobs, which every reader verifies
  against their SHA-256. Nothing else: no other inbox, no version record, no control stream.

Passwords are random, kept one file per user (mode 0600) in ``<data_dir>/secrets/redis-acl``,
and never logged.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from federated_learning.bus.connection import is_cluster
from federated_learning.protocol.keys import Keys
from federated_learning.secret_files import (
    SecretFileError,
    keep_or_create_secret,
    private_folder,
    read_secret,
)

log = logging.getLogger(__name__)

SECRETS_FOLDER = "redis-acl"
AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
"""The protocol's identifier rule; it also keeps glob characters out of ACL key patterns."""

CONNECT_COMMANDS = ("+ping", "+client|setinfo", "+cluster|info", "+cluster|slots", "+cluster|shards",
                    "+command")
"""What any client sends by itself: health checks, redis-py's library name on connect, the
question whether the server is a cluster (``bus/connection.py``) and, on a cluster, the slot map
and the command table a cluster client reads (metadata only, no keys)."""
SERVICE_COMMANDS = ("+@all", "-@admin", "-@dangerous", "+info")
DASHBOARD_COMMANDS = ("+@read", "+@write", "+@transaction", "+@connection", "-@admin",
                      "-@dangerous", "+info")
AGENT_STREAM_COMMANDS = ("+xadd",)
AGENT_INBOX_COMMANDS = ("+xgroup|create", "+xreadgroup", "+xack", "+xautoclaim")
AGENT_BLOB_READ_COMMANDS = ("+get", "+strlen", "+exists")
AGENT_UPLOAD_COMMANDS = ("+get", "+set", "+strlen", "+exists")


class AclError(ValueError):
    """An ACL user cannot be named, provisioned or found."""


@dataclass(frozen=True)
class AclUser:
    """One ACL user: its name and its rules (without the password)."""

    name: str
    rules: tuple[str, ...]

    def setuser_arguments(self, password: str) -> list[str]:
        """Arguments of ``ACL SETUSER``: start from nothing, so re-provisioning replaces the rules."""
        return [self.name, "reset", "on", f">{password}", "resetchannels", *self.rules]


def services_user_name(keys: Keys) -> str:
    return f"{keys.prefix}-services"


def dashboard_user_name(keys: Keys) -> str:
    return f"{keys.prefix}-dashboard"


def agent_user_prefix(keys: Keys) -> str:
    return f"{keys.prefix}-agent-"


def agent_user_name(keys: Keys, agent_id: str) -> str:
    """The ACL user of one agent; refuses ids that are not protocol identifiers."""
    if not AGENT_ID.match(agent_id):
        raise AclError(f"agent id {agent_id!r} is not a valid identifier "
                       "(letters, digits, '_', '.', '-'; at most 128; starts with a letter or digit)")
    return agent_user_prefix(keys) + agent_id


def services_user(keys: Keys) -> AclUser:
    return AclUser(services_user_name(keys),
                   (f"~{keys.all_keys_pattern}", "-@all", *SERVICE_COMMANDS, *CONNECT_COMMANDS))


def dashboard_user(keys: Keys) -> AclUser:
    writable = tuple(f"~{pattern}" for pattern in keys.dashboard_write_keys())
    return AclUser(dashboard_user_name(keys),
                   (f"%R~{keys.all_keys_pattern}", *writable, "-@all", *DASHBOARD_COMMANDS,
                    *CONNECT_COMMANDS))


def agent_user(keys: Keys, agent_id: str) -> AclUser:
    """Root rules for the streams it appends to, one selector per other kind of key."""
    streams = tuple(f"%W~{key}" for key in keys.agent_write_keys())
    inbox = _selector((f"~{keys.inbox_stream(agent_id)}", *AGENT_INBOX_COMMANDS))
    # Models and optimiser state are read-only to agents; they write only their own uploads.
    blobs = _selector((f"%R~{keys.blob_pattern}", *AGENT_BLOB_READ_COMMANDS))
    uploads = _selector((f"~{keys.upload_pattern(agent_id)}", *AGENT_UPLOAD_COMMANDS))
    return AclUser(agent_user_name(keys, agent_id),
                   ("-@all", *CONNECT_COMMANDS, *AGENT_STREAM_COMMANDS, *streams, inbox, blobs, uploads))


def role_users(keys: Keys) -> list[AclUser]:
    return [services_user(keys), dashboard_user(keys)]


def _selector(rules: Iterable[str]) -> str:
    return "(" + " ".join(rules) + ")"


def secrets_dir(data_dir: Path) -> Path:
    return data_dir / "secrets" / SECRETS_FOLDER


def stored_password(folder: Path, user: str) -> str:
    """The user's password from ``folder`` (a deployment's ``secrets/redis-acl``)."""
    path = folder / user
    if not path.exists():
        raise AclError(f"no password for Redis user '{user}' in {folder}; "
                       "provision it with scripts/deploy-federated-learning.py --provision-acl")
    try:
        return read_secret(path)
    except SecretFileError as exc:
        raise AclError(str(exc)) from exc


def password_for(data_dir: Path, user: str, *, create: bool) -> str:
    """The user's password from the secrets folder; a new random one (mode 0600) when asked to."""
    if not create:
        return stored_password(secrets_dir(data_dir), user)
    private_folder(data_dir / "secrets")
    folder = private_folder(secrets_dir(data_dir))
    return keep_or_create_secret(folder / user, lambda: secrets.token_urlsafe(32))


def provisioned_agents(keys: Keys, data_dir: Path) -> list[str]:
    """Agent ids with a password in the secrets folder (re-provisioned when the server restarts)."""
    prefix = agent_user_prefix(keys)
    folder = secrets_dir(data_dir)
    if not folder.is_dir():
        return []
    return sorted(path.name.removeprefix(prefix) for path in folder.iterdir()
                  if path.name.startswith(prefix))


async def provision(admin: aioredis.Redis, keys: Keys, data_dir: Path,
                    agent_ids: Iterable[str] = (), *, save: bool = True) -> list[str]:
    """Create or update the role users and the agents' users; return the user names.

    Existing passwords are kept, so running it again for new agents does not lock out
    running processes. With ``save`` the rules are then written to the server's ACL file
    when it has one (the embedded server needs none: the launcher provisions at each start).
    """
    # A cluster keeps ACL users per node, replicas included: each is set on every node.
    every_node = {"target_nodes": RedisCluster.ALL_NODES} if is_cluster(admin) else {}
    users = role_users(keys) + [agent_user(keys, agent_id) for agent_id in agent_ids]
    for user in users:
        password = password_for(data_dir, user.name, create=True)
        try:
            await admin.execute_command(  # type: ignore[no-untyped-call]
                "ACL", "SETUSER", *user.setuser_arguments(password), **every_node)
        except ResponseError as exc:
            raise AclError(f"the server refused ACL SETUSER for '{user.name}': {exc}") from exc
    if save:
        await _save_acl(admin, every_node)
    log.info("provisioned %d Redis ACL users (passwords in %s)", len(users), secrets_dir(data_dir))
    return [user.name for user in users]


async def _save_acl(admin: aioredis.Redis, every_node: dict[str, str]) -> None:
    try:
        await admin.execute_command("ACL", "SAVE", **every_node)  # type: ignore[no-untyped-call]
    except ResponseError as exc:
        log.warning("ACL users are live but not saved on the server (%s); re-run the "
                    "provisioning after a server restart, or configure an aclfile", exc)
