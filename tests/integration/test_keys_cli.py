"""The key-management command against the test server: keys are printed once, stored hashed."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis

from federated_learning.dashboard.keys import CommandFailed, main, parser, run_command
from federated_learning.protocol.keys import Keys
from federated_learning.records.organisations import Organisations

KEYS = Keys()


async def run(redis: aioredis.Redis, *argv: str) -> str:
    return await run_command(parser().parse_args(list(argv)), redis, KEYS)


async def test_create_list_and_revoke_a_key(redis: aioredis.Redis) -> None:
    await run(redis, "org-create", "acme", "--name", "Acme Inc.")
    await run(redis, "project-create", "--org", "acme", "vision")
    created = json.loads(await run(redis, "create", "--org", "acme", "--role", "operator", "--name", "ci",
                                   "--expires-in-days", "30"))
    key = created["api_key"]
    orgs = Organisations(redis, KEYS)
    assert (await orgs.authenticate(key)) is not None
    assert key not in (await redis.hget(KEYS.api_keys, created["key_id"]) or b"").decode()

    listed = json.loads(await run(redis, "list", "--org", "acme"))
    assert [k["key_id"] for k in listed] == [created["key_id"]] and "api_key" not in listed[0]
    assert created["expires_at"] is not None and listed[0]["role"] == "operator"

    await run(redis, "revoke", created["key_id"])
    assert await orgs.authenticate(key) is None


@pytest.mark.parametrize("argv", [
    ("create", "--org", "nowhere", "--role", "admin", "--name", "x"),
    ("project-create", "--org", "nowhere", "p"),
    ("org-create", "Not_A_Slug"),
    ("org-create", "default"),
    ("revoke", "0123456789ab"),
    ("create", "--org", "default", "--role", "admin", "--name", "x", "--expires-in-days", "0"),
])
async def test_impossible_commands_fail_with_a_reason(redis: aioredis.Redis, argv: tuple[str, ...]) -> None:
    with pytest.raises(CommandFailed):
        await run(redis, *argv)
    assert await redis.hlen(KEYS.api_keys) == 0


def test_main_prints_the_key_once(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--redis-url", redis_url, "create", "--org", "default", "--role", "viewer", "--name", "bot"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["api_key"].startswith("flk_") and printed["org_id"] == "default"
    assert main(["--redis-url", redis_url, "create", "--org", "nowhere", "--role", "viewer", "--name", "x"]) == 1
    assert "no organisation 'nowhere'" in capsys.readouterr().err
