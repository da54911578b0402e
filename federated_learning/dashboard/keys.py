"""Manage organisations, projects and API keys from the command line.

Talks to the deployment's Redis: ``--redis-url``, else the URL in
``<data_dir>/run/deployment.json`` (written by the launcher), else ``redis_url`` in the config.

    python -m federated_learning.dashboard.keys org-create acme --name "Acme Inc."
    python -m federated_learning.dashboard.keys project-create --org acme vision
    python -m federated_learning.dashboard.keys create --org acme --role admin --name alice [--expires-in-days 90]
    python -m federated_learning.dashboard.keys list [--org acme]
    python -m federated_learning.dashboard.keys revoke KEY_ID

``create`` prints the new key once; only its SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

from federated_learning.access import Role
from federated_learning.bus.connection import connect, keys_for
from federated_learning.config import Settings, load_settings
from federated_learning.deploy.launcher import read_deployment
from federated_learning.protocol.keys import Keys
from federated_learning.records.organisations import Organisations, UnknownOrganisation

DAY_S = 86400.0


class CommandFailed(RuntimeError):
    """A command that could not be done (unknown organisation, taken id); the message says why."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m federated_learning.dashboard.keys",
                                description="organisations, projects and API keys of a deployment")
    p.add_argument("--config", type=Path, default=None, help="config.json of the deployment")
    p.add_argument("--redis-url", default="", help="default: from <data_dir>/run/deployment.json")
    sub = p.add_subparsers(dest="command", required=True)
    org = sub.add_parser("org-create", help="create an organisation")
    org.add_argument("org")
    org.add_argument("--name", default="")
    project = sub.add_parser("project-create", help="create a project in an organisation")
    project.add_argument("project")
    project.add_argument("--org", required=True)
    project.add_argument("--name", default="")
    create = sub.add_parser("create", help="create an API key (printed once)")
    create.add_argument("--org", required=True)
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--name", required=True, help="who or what holds the key")
    create.add_argument("--expires-in-days", type=float, default=None)
    listing = sub.add_parser("list", help="list API keys (never the keys themselves)")
    listing.add_argument("--org", default=None)
    revoke = sub.add_parser("revoke", help="revoke an API key by its id")
    revoke.add_argument("key_id")
    return p


async def run_command(args: argparse.Namespace, redis: aioredis.Redis, keys: Keys) -> str:
    """Do one command against ``redis``; return what to show. Raises CommandFailed."""
    orgs = Organisations(redis, keys)
    try:
        if args.command == "org-create":
            return (await orgs.create_org(args.org, args.name)).model_dump_json()
        if args.command == "project-create":
            return (await orgs.create_project(args.org, args.project, args.name)).model_dump_json()
        if args.command == "create":
            return await _create_key(orgs, args)
        if args.command == "list":
            return json.dumps([record.public() for record in await orgs.keys(args.org)], indent=1)
        record = await orgs.revoke_key(args.key_id)
        if record is None:
            raise CommandFailed(f"no API key '{args.key_id}'")
        return json.dumps(record.public())
    except (UnknownOrganisation, ValueError) as exc:  # ValueError: a bad or taken id (OrganisationExists)
        raise CommandFailed(str(exc)) from exc


async def _create_key(orgs: Organisations, args: argparse.Namespace) -> str:
    if args.expires_in_days is not None and args.expires_in_days <= 0:
        raise CommandFailed(f"--expires-in-days must be > 0; got {args.expires_in_days}")
    expires_at = None if args.expires_in_days is None else time.time() + args.expires_in_days * DAY_S
    key, record = await orgs.create_key(args.org, Role(args.role), args.name, expires_at)
    return json.dumps({"api_key": key, **record.public(),
                       "note": "the key is shown only now; only its SHA-256 is stored"}, indent=1)


def redis_url_of(settings: Settings, given: str) -> str:
    """``given``, else the running deployment's URL, else the configured one."""
    if given:
        return given
    try:
        return read_deployment(settings.data_dir.resolve())["redis_url"]
    except FileNotFoundError:
        if settings.redis_url:
            return settings.redis_url
        raise


async def _main(args: argparse.Namespace) -> str:
    settings = load_settings(args.config)
    redis = await connect(redis_url_of(settings, args.redis_url), settings, attempts=3)
    try:
        return await run_command(args, redis, keys_for(redis, settings.redis_key_prefix, settings.coordinator_partitions))
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        output = asyncio.run(_main(args))
    except (CommandFailed, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(output + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
