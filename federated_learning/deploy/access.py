"""Which Redis URL each process of a deployment connects with, how it gets it, and ``--provision-acl``.

Without ACL mode every process uses the deployment's URL (the embedded server's password,
or whatever ``redis_url`` names). In ACL mode (the default with the embedded server) the
services and the dashboard each log in as their own ACL user
(:mod:`federated_learning.deploy.acl`): on the embedded server the launcher creates the users
at every start; on an external server an operator creates them once with
``scripts/deploy-federated-learning.py --provision-acl --admin-url URL``.

A service finds its URL (and the dashboard the API key) in owner-only files of its role's
folder, named by ``$FL_SECRETS_DIR``, not in its environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from federated_learning.bus.connection import connect, keys_for, redacted, with_credentials
from federated_learning.config import REDIS_ADMIN_URL_ENV, Settings
from federated_learning.deploy import acl
from federated_learning.protocol.keys import Keys
from federated_learning.secret_files import private_folder, read_secret, write_secret

log = logging.getLogger(__name__)

ADMIN_URL_ENV = REDIS_ADMIN_URL_ENV
"""An admin URL in the environment keeps its password off the command line (and ``ps``)."""


@dataclass(frozen=True)
class RoleUrls:
    """The Redis URL of the services and of the dashboard (the HTTP gateway)."""

    services: str
    dashboard: str

    def for_service(self, service: str) -> str:
        return self.dashboard if service == "dashboard" else self.services


@dataclass(frozen=True)
class RoleSecrets:
    """The folder of owner-only setting files of the services and of the dashboard."""

    services: Path
    dashboard: Path

    def for_service(self, service: str) -> Path:
        return self.dashboard if service == "dashboard" else self.services


def write_role_secrets(folder: Path, urls: RoleUrls, api_key: str) -> RoleSecrets:
    """Each role's secret settings as files (folders 0700, files 0600) that ``load_settings``
    reads through ``$FL_SECRETS_DIR``: its Redis URL, and for the dashboard the API key, which no
    other service uses."""
    private_folder(folder)
    roles = RoleSecrets(private_folder(folder / "services"), private_folder(folder / "dashboard"))
    write_secret(roles.services / "FL_REDIS_URL", urls.services)
    write_secret(roles.dashboard / "FL_REDIS_URL", urls.dashboard)
    write_secret(roles.dashboard / "FL_API_KEY", api_key)
    return roles


def plain_url(url: str) -> str:
    """``url`` without user and password (what agents combine with their own credentials)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def role_urls(settings: Settings, url: str, data_dir: Path) -> RoleUrls:
    """Each role's URL: ``url`` itself, or in ACL mode ``url`` with the role's ACL user."""
    if not settings.redis_acl:
        return RoleUrls(url, url)
    keys = Keys(settings.redis_key_prefix)

    def login(user: str) -> str:
        return with_credentials(url, user, acl.password_for(data_dir, user, create=False))

    return RoleUrls(login(acl.services_user_name(keys)), login(acl.dashboard_user_name(keys)))


async def provision_users(settings: Settings, admin_url: str, data_dir: Path,
                          agent_ids: Iterable[str] = (), *, save: bool = True) -> list[str]:
    """Connect as an administrator and create or update the role users and ``agent_ids``'s."""
    admin = await connect(admin_url, settings, attempts=settings.redis_connect_attempts)
    try:
        return await acl.provision(admin, keys_for(admin, settings.redis_key_prefix, settings.coordinator_partitions), data_dir,
                                   agent_ids, save=save)
    finally:
        await admin.aclose()


def provision_at_start(settings: Settings, admin_url: str, data_dir: Path, *, save: bool) -> None:
    """The launcher's step in ACL mode: the role users, the configured agents, and every agent
    provisioned before (their passwords are in the secrets folder; the embedded server keeps
    no ACL file, so they are created again at each start)."""
    keys = Keys(settings.redis_key_prefix)
    agents = sorted({*settings.redis_acl_agents, *acl.provisioned_agents(keys, data_dir)})
    asyncio.run(provision_users(settings, admin_url, data_dir, agents, save=save))


def admin_url_for(settings: Settings, data_dir: Path, given: str | None,
                  running_url: str | None) -> str:
    """The administrator's URL: ``given``, else ``$FL_REDIS_ADMIN_URL``, else the running
    embedded server with its password (the server's default user)."""
    url = given or os.environ.get(ADMIN_URL_ENV)
    if url:
        return url
    password_file = data_dir / "secrets" / "redis_password"
    if settings.uses_embedded_redis and running_url and password_file.exists():
        return with_credentials(plain_url(running_url), "default", read_secret(password_file))
    raise acl.AclError(f"no admin URL: pass --admin-url or set {ADMIN_URL_ENV} (or start the "
                       "deployment first when it uses the embedded server)")


def provision_command(settings: Settings, data_dir: Path, admin_url: str,
                      agent_ids: list[str]) -> int:
    """``--provision-acl``: create the users; tell where the passwords are, never what they are.

    An external server is asked to save them (ACL SAVE); the embedded one needs not: the
    launcher creates them again from the secrets folder at each start."""
    names = asyncio.run(provision_users(settings, admin_url, data_dir, agent_ids,
                                        save=not settings.uses_embedded_redis))
    log.info("Redis ACL users on %s: %s; passwords (mode 0600) in %s",
             redacted(plain_url(admin_url)), ", ".join(names), acl.secrets_dir(data_dir))
    return 0
