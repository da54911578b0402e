"""Closed registration: first joins need an operator's join token."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import AgentJoined, encode
from federated_learning.records.agents import AgentRegistry

KEYS = Keys()


async def join(redis: aioredis.Redis, agent: str, token: str | None) -> None:
    await redis.xadd(KEYS.agent_stream, encode(AgentJoined(agent_id=agent, datasets={"d": 1}, join_token=token)))  # type: ignore[arg-type]


async def registered(redis: aioredis.Redis) -> set[str]:
    return {k.decode() for k in await redis.hkeys(KEYS.agents)}


async def test_first_join_needs_a_valid_token_and_uses_are_counted(redis: aioredis.Redis, system, settings) -> None:
    system.settings = settings.model_copy(update={"require_join_token": True})
    await system.start("coordinator")
    tokens = AgentRegistry(redis, KEYS, 10.0).tokens
    token, _record = await tokens.create("lab", max_uses=1)

    await join(redis, "no-token", None)
    await join(redis, "wrong-token", "guess")
    await join(redis, "first", token)
    await join(redis, "second", token)
    await join(redis, "first", None)  # a registered agent re-joins without a token
    for _ in range(100):
        if int(await redis.hget(KEYS.rejections, "agents:bad_join_token") or 0) == 3:
            break
        await asyncio.sleep(0.05)

    assert await registered(redis) == {"first"}
    assert int(await redis.hget(KEYS.rejections, "agents:bad_join_token")) == 3
    [stored] = await tokens.all()
    assert stored.uses_left == 0 and token not in stored.model_dump_json()


async def test_a_project_token_binds_the_agent_and_an_expired_one_is_refused(redis: aioredis.Redis) -> None:
    registry = AgentRegistry(redis, KEYS, 10.0)
    token, _record = await registry.tokens.create("vision", org_id="acme", project_id="vision")
    expired, _record = await registry.tokens.create("old", org_id="acme", project_id="vision", ttl_s=-1.0)

    joined = await registry.apply(AgentJoined(agent_id="bound", datasets={"d": 1}, join_token=token))
    refused = await registry.apply(AgentJoined(agent_id="late", datasets={"d": 1}, join_token=expired))
    plain = await registry.apply(AgentJoined(agent_id="plain", datasets={"d": 1}))
    rejoined = await registry.apply(AgentJoined(agent_id="bound", datasets={"d": 2}))

    assert joined.event == "agent_joined" and rejoined.event == "agent_rejoined" and plain.event == "agent_joined"
    assert refused.rejected == "bad_join_token"
    bound, default = await registry.get("bound"), await registry.get("plain")
    assert bound is not None and bound.project == ("acme", "vision") and bound.datasets == {"d": 2}
    assert default is not None and default.project == ("default", "default")
    assert set(await registry.datasets(("acme", "vision"))) == {"bound"}
    assert set(await registry.datasets(("default", "default"))) == {"plain"}
    assert [t.label for t in await registry.tokens.all("acme")] == ["vision"]  # the expired one is deleted
    assert await registry.tokens.all("globex") == []


async def test_expired_tokens_and_a_deleted_projects_tokens_are_forgotten(redis: aioredis.Redis) -> None:
    from federated_learning.records.join_tokens import JoinTokens
    from federated_learning.records.organisations import Organisations

    orgs = Organisations(redis, KEYS)
    await orgs.create_org("acme")
    await orgs.create_project("acme", "vision")
    tokens = JoinTokens(redis, KEYS)
    expired, _ = await tokens.create("old", org_id="acme", project_id="vision", ttl_s=-1)
    vision, _ = await tokens.create("cams", org_id="acme", project_id="vision")
    kept, _ = await tokens.create("default")

    assert await tokens.redeem(expired) is None
    assert {t.label for t in await tokens.all()} == {"cams", "default"}  # the expired one is gone
    assert await orgs.delete_project("acme", "vision")
    assert await tokens.redeem(vision) is None  # a deleted project's agents cannot join any more
    assert await tokens.redeem(kept) is not None
