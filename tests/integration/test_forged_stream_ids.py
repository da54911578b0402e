"""Writer-chosen stream ids against the real server: refused, repaired, and survived.

An agent may XADD with any id (ACLs cannot restrict it); the maximum id makes every later XADD
on that stream fail. The services' consumers delete such an entry, move the entries after it to
server ids, reset the stream, and report the forgery; agents' loops and sends outlast it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from agents.client import FederatedClient
from agents.data import make_client_datasets
from federated_learning.bus.connection import connect, with_credentials
from federated_learning.bus.consumer import StreamConsumer
from federated_learning.bus.embedded import EmbeddedValkey
from federated_learning.bus.replies import text
from federated_learning.bus.stream_ids import (
    FORGED_ID_TOLERANCE_MS,
    StreamRepair,
    append,
    id_millis,
    repair_stream,
)
from federated_learning.config import Settings
from federated_learning.coordination.state import TrainingState
from federated_learning.deploy import acl
from federated_learning.deploy.access import plain_url, provision_at_start
from federated_learning.protocol.events import Event
from federated_learning.protocol.keys import GROUP_COORDINATOR, Keys
from federated_learning.protocol.messages import Heartbeat, decode, encode
from tests.integration.conftest import (
    System,
    digits_config,
    start_training,
    wait_for_status,
    wait_until,
)

KEYS = Keys()
STREAM = "test:forged"
MAX_ID = "18446744073709551615-18446744073709551615"
DAY_MS = 86_400_000
ROUND_AGENTS = [f"honest-{i}" for i in range(4)]
ATTACKER = "mallory"
ADMIN_PASSWORD = "admin-password-forged-ids-0123"
WAIT_S = 20.0


async def server_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def last_generated_id(redis: aioredis.Redis, stream: str) -> str:
    return text((await redis.xinfo_stream(stream))["last-generated-id"])


async def failed_xadds(redis: aioredis.Redis) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_xadd", {}).get("failed_calls", 0))


class Recorder:
    """A handler that keeps what it saw, and a reporter that keeps the repairs."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.repairs: list[StreamRepair] = []

    async def handle(self, _id: bytes, fields: dict[bytes, bytes]) -> None:
        self.seen.append(fields[b"n"])

    async def report(self, repair: StreamRepair) -> None:
        self.repairs.append(repair)

    def consumer(self, redis: aioredis.Redis, group: str = "g") -> StreamConsumer:
        return StreamConsumer(redis, group, f"{group}-0", {STREAM: self.handle}, dead_letter_stream="test:dead",
                              block_ms=50, on_forged_id=self.report)


async def test_a_forged_id_is_deleted_and_the_entries_after_it_move_to_server_ids_once(
        redis: aioredis.Redis) -> None:
    main, lagging = Recorder(), Recorder()
    await main.consumer(redis).setup()
    await lagging.consumer(redis, "lagging").setup()
    await redis.xadd(STREAM, {"n": "before"})
    forged = f"{await server_ms(redis) + DAY_MS}-0"
    await redis.xadd(STREAM, {"n": "forged"}, id=forged)
    numbered_after_it = [text(await redis.xadd(STREAM, {"n": f"after-{i}"})) for i in range(2)]
    assert all(id_millis(entry_id) == id_millis(forged) for entry_id in numbered_after_it)
    await redis.xreadgroup("g", "g-0", {STREAM: ">"})  # read, then the consumer crashed: all pending

    await main.consumer(redis).run(asyncio.Event(), burst=True)  # handles its pending entries first
    await redis.xadd(STREAM, {"n": "later"})
    await main.consumer(redis).run(asyncio.Event(), burst=True)
    await lagging.consumer(redis, "lagging").run(asyncio.Event(), burst=True)

    expected = [b"before", b"after-0", b"after-1", b"later"]
    assert main.seen == expected and lagging.seen == expected
    [repair] = main.repairs
    assert repair.forged_id == forged and set(repair.moved) == set(numbered_after_it)
    assert lagging.repairs == []
    now = await server_ms(redis)
    assert id_millis(await last_generated_id(redis, STREAM)) <= now
    assert all(id_millis(entry_id) <= now for entry_id, _fields in await redis.xrange(STREAM))
    for group in ("g", "lagging"):
        assert (await redis.xpending(STREAM, group))["pending"] == 0


@pytest.mark.parametrize("already_deleted", [False, True], ids=["entry_present", "entry_deleted"])
async def test_a_stream_exhausted_by_the_max_id_is_repaired_behind_a_backlog(
        redis: aioredis.Redis, already_deleted: bool) -> None:
    recorder = Recorder()
    consumer = recorder.consumer(redis)
    await consumer.setup()
    for n in range(3):
        await redis.xadd(STREAM, {"n": f"backlog-{n}"})
    await redis.xadd(STREAM, {"n": "forged"}, id=MAX_ID)
    if already_deleted:  # XDEL keeps the last id, and XSETID then refuses anything below it
        await redis.xdel(STREAM, MAX_ID)
    with pytest.raises(ResponseError, match="exhausted the last possible ID"):
        await redis.xadd(STREAM, {"n": "refused"})

    assert await consumer.guard_streams() == 1
    assert await consumer.guard_streams() == 0
    await redis.xadd(STREAM, {"n": "accepted"})
    await consumer.run(asyncio.Event(), burst=True)

    assert recorder.seen == [b"backlog-0", b"backlog-1", b"backlog-2", b"accepted"]
    [repair] = recorder.repairs
    assert repair.last_id == MAX_ID and repair.forged_id == ("" if already_deleted else MAX_ID)
    assert id_millis(repair.reset_to) <= await server_ms(redis)


async def test_repairing_a_sound_stream_or_another_key_changes_nothing(redis: aioredis.Redis) -> None:
    entry = text(await redis.xadd(STREAM, {"n": "1"}))
    before = await redis.xinfo_stream(STREAM)
    outcome = await repair_stream(redis, STREAM, entry)
    assert outcome.repair is None and outcome.entry_exists
    assert await redis.xinfo_stream(STREAM) == before
    await redis.set("test:string", "x")
    assert (await repair_stream(redis, "test:string", entry)).repair is None
    assert (await repair_stream(redis, "test:missing")).repair is None


async def test_a_send_refused_by_a_forged_id_goes_through_after_the_repair(redis: aioredis.Redis) -> None:
    await redis.xadd(STREAM, {"n": "forged"}, id=MAX_ID)
    with pytest.raises(ResponseError, match="exhausted"):
        await append(redis, STREAM, {"n": "impatient"}, retry_for_s=0.0)
    refused = await failed_xadds(redis)
    send = asyncio.create_task(append(redis, STREAM, {"n": "notice"}))
    await wait_until(lambda: failed_xadds_above(redis, refused), "the send was refused")
    assert not send.done()

    await repair_stream(redis, STREAM)
    entry_id = await asyncio.wait_for(send, WAIT_S)

    assert await redis.xrange(STREAM) == [(entry_id.encode(), {b"n": b"notice"})]


async def failed_xadds_above(redis: aioredis.Redis, count: int) -> bool:
    return await failed_xadds(redis) > count


async def test_an_agents_heartbeats_outlast_an_exhausted_agent_stream(redis: aioredis.Redis, redis_url: str) -> None:
    agent = FederatedClient("beating", redis_url=redis_url, heartbeat_interval_s=0.05)
    await agent.initialize()
    try:
        await redis.xadd(KEYS.agent_stream, encode(Heartbeat(agent_id=ATTACKER)), id=MAX_ID)
        await wait_until(lambda: agent.bus_errors > 0, "the heartbeat was refused")

        repair = (await repair_stream(redis, KEYS.agent_stream)).repair
        assert repair is not None

        async def beat_after_repair() -> bool:
            entries = await redis.xrange(KEYS.agent_stream, min=f"({repair.reset_to}")
            return any(b"beating" in fields[b"m"] for _id, fields in entries)

        await wait_until(beat_after_repair, "a heartbeat after the repair")
    finally:
        await agent.close()


async def test_a_consumer_outlives_a_refused_read_and_recreates_its_group(redis: aioredis.Redis) -> None:
    recorder = Recorder()
    consumer = recorder.consumer(redis)
    stop = asyncio.Event()
    await redis.xadd(STREAM, {"n": "first"})
    running = asyncio.create_task(consumer.run(stop))
    try:
        await wait_until(lambda: recorder.seen == [b"first"], "the first entry")
        await redis.delete(STREAM)  # the group goes with it: the next read is refused (NOGROUP)
        await wait_until(lambda: consumer.stats.bus_errors > 0, "the refused read")
        await wait_until(lambda: redis.exists(STREAM), "the group created again")
        await redis.xadd(STREAM, {"n": "second"})
        await wait_until(lambda: recorder.seen == [b"first", b"second"], "the second entry")
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, WAIT_S)


# -- a training on a locked-down server, with an agent that forges ids -----------------------


@dataclass(frozen=True)
class AclServer:
    url: str
    data_dir: Path

    def login(self, user: str) -> str:
        return with_credentials(plain_url(self.url), user, acl.password_for(self.data_dir, user, create=False))


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    root = tmp_path_factory.mktemp("forged-acl")
    server = EmbeddedValkey(root / "redis", password=ADMIN_PASSWORD)
    url = server.start()
    settings = Settings(redis_acl=True, redis_acl_agents=[*ROUND_AGENTS, ATTACKER], data_dir=root)
    provision_at_start(settings, url, root, save=False)
    yield AclServer(url, root)
    server.stop()


@pytest.fixture
async def observer(acl_server: AclServer) -> AsyncIterator[aioredis.Redis]:
    admin = aioredis.Redis.from_url(acl_server.url)
    await admin.flushall()
    await admin.execute_command("ACL", "LOG", "RESET")
    client = await connect(acl_server.login(acl.services_user_name(KEYS)), attempts=1)
    yield client
    await client.aclose()
    assert await admin.execute_command("ACL", "LOG") == [], "a role was denied a command it used"
    await admin.aclose()


async def wait_for_round(redis: aioredis.Redis, training_id: str, round_number: int) -> None:
    async def collecting() -> bool:
        raw = await redis.get(KEYS.training(training_id))
        state = TrainingState.model_validate_json(raw) if raw else None
        return state is not None and state.round >= round_number and state.phase == "collecting"

    await wait_until(collecting, f"round {round_number} collecting")


async def all_seen_since(redis: aioredis.Redis, at: float) -> bool:
    last_seen = dict(await redis.zrange(KEYS.agents_last_seen, 0, -1, withscores=True))
    return all(last_seen.get(agent.encode(), 0.0) > at for agent in ROUND_AGENTS)


async def forged_id_events(redis: aioredis.Redis) -> list[Event]:
    events = [decode(Event, fields) for _id, fields in await redis.xrange(KEYS.event_stream)]
    return [e for e in events if e.kind == "input_rejected" and e.data.get("reason") == "forged_stream_id"]


async def test_a_training_completes_while_an_agent_forges_the_max_id_on_both_streams(
        acl_server: AclServer, observer: aioredis.Redis, settings: Settings) -> None:
    system = System(acl_server.login(acl.services_user_name(KEYS)), settings)
    attacker = await connect(acl_server.login(acl.agent_user_name(KEYS, ATTACKER)), attempts=1)
    datasets, _test = make_client_datasets(len(ROUND_AGENTS), "iid", 0)
    agents = []
    for agent_id, data in zip(ROUND_AGENTS, datasets, strict=True):
        agent = FederatedClient(agent_id, redis_url=acl_server.login(acl.agent_user_name(KEYS, agent_id)),
                                heartbeat_interval_s=settings.heartbeat_interval_s)
        agent.add_dataset("digits", data.train.x, data.train.y, x_eval=data.eval.x, y_eval=data.eval.y)
        agents.append(agent)
    await system.start()
    dead_letters = system.contexts["coordinator"].dead_letter_stream
    try:
        await asyncio.gather(*(agent.initialize() for agent in agents))
        await start_training(observer, "forged", digits_config(rounds=3, clients_per_round=4, min_clients=4))
        await wait_for_round(observer, "forged", 2)
        forged_at = (await server_ms(observer)) / 1000
        for stream in (KEYS.agent_stream, KEYS.update_stream):
            assert await attacker.xadd(stream, encode(Heartbeat(agent_id=ATTACKER)), id=MAX_ID) == MAX_ID.encode()
        state = await wait_for_status(observer, "forged", {"completed", "failed"})
        await wait_until(lambda: all_seen_since(observer, forged_at), "a heartbeat of every agent after the forgery")
    finally:
        await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)
        await system.stop()
        await attacker.aclose()

    assert state.status == "completed", state.reason
    rejections = {text(k): int(v) for k, v in (await observer.hgetall(KEYS.rejections)).items()}
    assert rejections.get("agents:forged_stream_id") == 1 and rejections.get("updates:forged_stream_id") == 1
    assert not {"updates:duplicate", "updates:stale_round"} & set(rejections), rejections
    assert {e.data["source_stream"] for e in await forged_id_events(observer)} == {"agents", "updates"}
    for round_number in (1, 2, 3):
        accepted = await observer.hkeys(KEYS.round_updates("forged", round_number))
        assert sorted(text(agent) for agent in accepted) == ROUND_AGENTS, round_number
    now = await server_ms(observer)
    for stream in (KEYS.agent_stream, KEYS.update_stream):
        assert id_millis(await last_generated_id(observer, stream)) <= now + FORGED_ID_TOLERANCE_MS
    assert await observer.xlen(dead_letters) == 0
    assert (await observer.xpending(KEYS.update_stream, GROUP_COORDINATOR))["pending"] == 0
