"""The registry against junk: first joins are rate-limited per credential, an unchanged re-join is
only a sign of life, and choosing agents for a round reads only the live ones."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from agents.client import REJOIN_INTERVAL_S, FederatedClient
from federated_learning.protocol.agents import AgentRecord
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import AgentJoined, Heartbeat
from federated_learning.records.agents import OPEN_REGISTRATION, AgentRegistry, join_credential

KEYS = Keys()


def joined(agent: str, token: str | None = None, datasets: dict[str, int] | None = None) -> AgentJoined:
    return AgentJoined(agent_id=agent, datasets=datasets or {"d": 1}, join_token=token)


async def test_first_joins_are_limited_per_credential_and_known_agents_rejoin_freely(redis: aioredis.Redis) -> None:
    registry = AgentRegistry(redis, KEYS, 60.0, max_first_joins_per_minute=3)
    token, _record = await registry.tokens.create("lab", max_uses=10)

    open_outcomes = [await registry.apply(joined(f"open-{i}")) for i in range(5)]
    token_outcomes = [await registry.apply(joined(f"token-{i}", token)) for i in range(4)]
    rejoin = await registry.apply(joined("open-0", datasets={"d": 2}))

    assert [o.event for o in open_outcomes[:3]] == ["agent_joined"] * 3
    assert [o.rejected for o in open_outcomes[3:]] == ["join_rate_limited"] * 2
    assert "more than 3 new agents per minute" in (open_outcomes[3].detail or "")
    # a join token is another credential: its own three, then refused without spending a use
    assert [o.event for o in token_outcomes[:3]] == ["agent_joined"] * 3
    assert token_outcomes[3].rejected == "join_rate_limited"
    [stored] = await registry.tokens.all()
    assert stored.uses_left == 10 - 3
    assert rejoin.event == "agent_rejoined"  # a known agent is never counted as a first join
    assert {k.decode() for k in await redis.hkeys(KEYS.agents)} == {
        "open-0", "open-1", "open-2", "token-0", "token-1", "token-2"}


def test_a_join_token_is_counted_by_its_hash_not_its_value() -> None:
    assert join_credential(None) == OPEN_REGISTRATION
    credential = join_credential("s3cret-token")
    assert credential.startswith("token-") and "s3cret" not in credential
    assert credential == join_credential("s3cret-token") != join_credential("other")


async def test_an_unchanged_rejoin_is_only_a_sign_of_life(redis: aioredis.Redis) -> None:
    registry = AgentRegistry(redis, KEYS, 60.0)
    first = await registry.apply(joined("bot"), at=time.time() - 30)
    seen_first = (await registry.last_seen())["bot"]
    again = await registry.apply(joined("bot"))

    assert first.event == "agent_joined"
    assert again.event is None and again.rejected is None
    assert (await registry.last_seen())["bot"] > seen_first


async def test_choosing_agents_reads_only_the_live_ones(redis: aioredis.Redis,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    registry = AgentRegistry(redis, KEYS, 60.0)
    long_ago = time.time() - 3600
    junk = {f"junk-{i:05d}": AgentRecord(agent_id=f"junk-{i:05d}", datasets={"d": 10},
                                         device={"pad": "x" * 200}).model_dump_json() for i in range(3000)}
    await redis.hset(KEYS.agents, mapping=junk)  # type: ignore[arg-type]
    await redis.zadd(KEYS.agents_last_seen, dict.fromkeys(junk, long_ago))
    for agent, datasets in (("live-a", {"d": 5}), ("live-b", {"d": 1, "e": 2}), ("live-c", {"e": 3})):
        await registry.apply(joined(agent, datasets=datasets))
    await registry.apply(Heartbeat(agent_id="junk-00007"))  # one of them is alive after all

    async def no_full_scan() -> list[AgentRecord]:
        raise AssertionError("choosing agents must not read every registered agent")

    monkeypatch.setattr(registry, "all", no_full_scan)
    assert await registry.eligible("d") == ["junk-00007", "live-a", "live-b"]
    assert await registry.eligible("e") == ["live-b", "live-c"]
    assert await registry.eligible("d", ("acme", "vision")) == []
    assert [r.agent_id for r in await registry.records(["live-c", "nobody", "live-a"])] == ["live-c", "live-a"]


def test_the_heartbeat_loop_resends_the_join_now_and_then() -> None:
    client = FederatedClient("bot", redis_url="redis://127.0.0.1:1", dataset="d", num_examples=10)
    assert isinstance(client.beat(), Heartbeat)
    client._joined_at -= REJOIN_INTERVAL_S
    beat = client.beat()
    assert isinstance(beat, AgentJoined) and beat.agent_id == "bot" and beat.datasets == client.dataset_sizes()
    assert isinstance(client.beat(), Heartbeat)


async def test_live_volunteers_come_from_their_index_not_from_every_record(
        redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = AgentRegistry(redis, KEYS, 60.0)
    for agent, volunteer in (("http-a", True), ("http-b", True), ("bot", False)):
        await registry.apply(AgentJoined(agent_id=agent, datasets={"d": 1}, volunteer=volunteer))
    await registry.apply(AgentJoined(agent_id="http-old", datasets={"d": 1}, volunteer=True), at=time.time() - 3600)
    await registry.apply(AgentJoined(agent_id="http-b", datasets={"d": 1}, volunteer=False))  # now a bot
    all_records = registry.all

    async def no_full_scan() -> list[AgentRecord]:
        raise AssertionError("live volunteers must not read every registered agent")

    monkeypatch.setattr(registry, "all", no_full_scan)
    assert await registry.live_volunteers("d") == ["http-a"]
    assert await registry.live_volunteers("e") == []
    monkeypatch.setattr(registry, "all", all_records)
    await redis.delete(KEYS.agent_volunteers)  # a registry from before the index
    await registry.index_volunteers()
    assert {v.decode() for v in await redis.smembers(KEYS.agent_volunteers)} == {"http-a", "http-old"}


async def test_liveness_is_counted_and_looked_up_for_some_agents_without_reading_the_registry(
        redis: aioredis.Redis) -> None:
    registry = AgentRegistry(redis, KEYS, 60.0)
    now = time.time()
    await redis.zadd(KEYS.agents_last_seen, {"fresh-1": now, "fresh-2": now - 30, "stale": now - 61})
    assert await registry.count_alive() == 2 == len(await registry.alive())
    assert await registry.alive_among(["stale", "fresh-2", "never-seen"]) == ["fresh-2"]
    assert await registry.alive_among([]) == []


async def test_the_writer_keeps_the_records_it_read_and_reads_again_what_it_rewrote(redis: aioredis.Redis) -> None:
    registry = AgentRegistry(redis, KEYS, 60.0, cache_records=True)
    await registry.apply(joined("a1", datasets={"d": 1}))
    [first] = await registry.records(["a1", "unknown"])
    # Only ``apply`` writes records; a write behind the writer's back shows that the kept one is used.
    await redis.hset(KEYS.agents, "a1", first.model_copy(update={"datasets": {"d": 99}}).model_dump_json())
    assert (await registry.get("a1")) == first == registry.cached("a1")
    await registry.apply(joined("a1", datasets={"d": 2}))  # a re-join with other datasets
    assert (await registry.records(["a1"]))[0].datasets == {"d": 2}
    registry.forget_records()
    assert registry.cached("a1") is None and (await registry.get("a1")) is not None
