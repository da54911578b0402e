"""Several coordinators and aggregators share a deployment safely: one coordinator works on a
partition of the trainings at a time under its lease, live coordinators split the partitions and a
standby takes over when one dies; aggregators share the jobs; every round is committed exactly once."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from federated_learning.bus.lease import Lease, LeaseLost
from federated_learning.bus.membership import Membership
from federated_learning.config import Settings
from federated_learning.coordination.partitions import partition_of
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import StopTraining, VersionRecord, encode
from tests.integration.conftest import digits_config, start_training, wait_for_status, wait_until

KEYS = Keys()
ROUNDS = 20


async def test_one_holder_at_a_time_and_the_same_holder_takes_its_lease_back(redis: aioredis.Redis) -> None:
    first, second = (Lease(redis, "test:lease", holder, ttl_s=1.5) for holder in ("a", "b"))
    assert await first.acquire() and first.valid()
    assert not await second.acquire() and not second.valid()
    with pytest.raises(LeaseLost):
        second.check()
    restarted = Lease(redis, "test:lease", "a", ttl_s=1.5)  # the same coordinator, restarted
    assert await restarted.acquire()
    await first.release()
    assert await second.acquire(), "a released lease is free at once"
    assert not await first.renew() and not first.valid()


async def test_a_holder_that_stops_renewing_gives_up_before_another_can_take_over(redis: aioredis.Redis) -> None:
    holder, standby = (Lease(redis, "test:lease", name, ttl_s=1.5) for name in ("a", "b"))
    assert await holder.acquire()
    taken_at = time.monotonic()

    async def standby_took_it() -> bool:
        return await standby.acquire()

    await wait_until(standby_took_it, "the standby takes the expired lease")
    assert not holder.valid(), "the old holder counted its lease as run out before it expired"
    assert time.monotonic() - taken_at >= 1.5 - 0.1


async def test_a_frozen_holder_cannot_write_once_another_took_the_lease(redis: aioredis.Redis) -> None:
    """The fence: a holder that paused past its lease (here: the key deleted, as its expiry would)
    loses its transaction, whether the other process took the lease before or after it began."""
    frozen, standby = (Lease(redis, "test:lease", name, ttl_s=30) for name in ("a", "b"))
    assert await frozen.acquire()

    began = redis.pipeline(transaction=True)
    await frozen.fence(began)  # the transaction starts while "a" holds the lease ...
    began.set("test:written-by", "a")
    await redis.delete("test:lease")
    assert await standby.acquire() and standby.epoch == frozen.epoch + 1  # ... and "b" takes it
    with pytest.raises(LeaseLost):
        await frozen.execute(began)
    await began.reset()
    assert await redis.get("test:written-by") is None

    frozen._valid_until = time.monotonic() + 10  # its own clock still says the lease is valid
    async with redis.pipeline(transaction=True) as late:
        with pytest.raises(LeaseLost):
            await frozen.fence(late)  # a transaction begun after the take-over
    assert not frozen.valid()

    held = redis.pipeline(transaction=True)
    await standby.fence(held)
    held.set("test:written-by", "b")
    assert await standby.renew()  # renewing does not move the epoch: the holder's write goes through
    await standby.execute(held)
    assert await redis.get("test:written-by") == b"b"


async def test_a_restarted_holder_fences_out_its_old_self_which_then_stands_by(redis: aioredis.Redis) -> None:
    old, restarted = (Lease(redis, "test:lease", "a", ttl_s=30) for _ in range(2))
    assert await old.acquire() and await restarted.acquire()
    assert restarted.epoch == old.epoch + 1
    async with redis.pipeline(transaction=True) as pipe:
        with pytest.raises(LeaseLost):
            await old.fence(pipe)
    assert not await old.acquire(), "the fenced-out process took the lease back by name"
    assert not await old.renew() and not old.valid()
    await old.release()
    assert await redis.get("test:lease") == b"a", "the fenced-out process released its restart's lease"
    held = redis.pipeline(transaction=True)
    await restarted.fence(held)  # the restart still holds its epoch
    await held.reset()
    await redis.delete("test:lease")
    assert await old.acquire(), "once the lease is free, the old process may take it like any other"


async def test_a_dropped_connection_is_not_a_lost_lease(redis: aioredis.Redis) -> None:
    """redis-py fails the EXEC of a watched connection that dropped with WatchError; the lease
    tells that apart from a take-over by reading the epoch again."""
    holder = Lease(redis, "test:lease", "a", ttl_s=30)
    assert await holder.acquire()
    pipe = redis.pipeline(transaction=True)
    await holder.fence(pipe)
    pipe.set("test:written-by", "a")
    watching = pipe.connection
    assert watching is not None
    await watching.send_command("CLIENT", "ID")
    await redis.execute_command("CLIENT", "KILL", "ID", await watching.read_response())  # it drops
    with pytest.raises(RedisConnectionError):
        await holder.execute(pipe)
    await pipe.reset()
    assert holder.valid()
    again = redis.pipeline(transaction=True)
    await holder.fence(again)
    again.set("test:written-by", "a")
    await holder.execute(again)
    assert await redis.get("test:written-by") == b"a"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"coordinator_lease_s": 2.0})


async def test_coordinators_hand_over_when_the_lease_is_lost_and_two_aggregators_share_the_jobs(
        redis: aioredis.Redis, system, make_agents, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="federated_learning")
    await system.start("coordinator", "coordinator:1", "aggregator", "aggregator:1", "privacy", "versions", "monitor")
    await make_agents(4)
    await start_training(redis, "shared", digits_config(rounds=ROUNDS, clients_per_round=4, min_clients=2))

    async def committed(rounds: int) -> bool:
        return await redis.hlen(KEYS.versions("shared")) > rounds

    await wait_until(lambda: committed(2), "two rounds committed", 60)
    holder = (await redis.get(KEYS.coordinator_lease) or b"").decode()
    assert holder in ("coordinator-0", "coordinator-1"), holder
    standby = "coordinator-1" if holder == "coordinator-0" else "coordinator-0"
    # As if the holder were cut off long enough for its lease to expire and be taken: it must
    # stop working at its next renewal, and whichever coordinator takes the lease next goes on.
    await redis.set(KEYS.coordinator_lease, "elsewhere", px=1500)
    stolen_at = await redis.hlen(KEYS.versions("shared")) - 1
    assert stolen_at < ROUNDS, "the training ended before the lease was taken: nothing was handed over"

    async def handed_over() -> bool:
        return await redis.get(KEYS.coordinator_lease) in (b"coordinator-0", b"coordinator-1")

    await wait_until(handed_over, "a coordinator holds the lease again", 30)
    done = await wait_for_status(redis, "shared", {"completed", "failed"}, timeout_s=120)

    assert done.status == "completed", done.reason
    assert f"coordinator {holder} lost its lease; standing by" in caplog.messages
    assert f"coordinator {standby} stands by: another coordinator holds the lease" in caplog.messages
    records = [VersionRecord.model_validate_json(raw) for raw in (await redis.hgetall(KEYS.versions("shared"))).values()]
    assert sorted(r.version for r in records) == list(range(ROUNDS + 1)), "version 0 and one version per round"
    assert sorted(r.round for r in records if r.version > 0) == list(range(1, ROUNDS + 1)), "each round once"
    consumers = await redis.xinfo_consumers(KEYS.job_stream, "aggregator")
    assert {c["name"].decode() for c in consumers} == {"aggregator-0", "aggregator-1"}, "both aggregators read jobs"
    assert all(c["pending"] == 0 for c in consumers)


PARTITIONS = 4


def one_training_per_partition() -> list[str]:
    """Training ids, one in each of the ``PARTITIONS`` partitions."""
    ids: dict[int, str] = {}
    k = 0
    while len(ids) < PARTITIONS:
        ids.setdefault(partition_of(f"split-{k}", PARTITIONS), f"split-{k}")
        k += 1
    return [ids[p] for p in range(PARTITIONS)]


async def test_live_coordinators_split_the_partitions_and_take_over_a_dead_ones(
        redis: aioredis.Redis, system, make_agents, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="federated_learning")
    system.settings = settings.model_copy(update={"coordinator_partitions": PARTITIONS,
                                                  "max_concurrent_trainings": PARTITIONS})
    await system.start("coordinator", "coordinator:1", "aggregator", "privacy", "versions", "monitor")
    await make_agents(4)
    trainings = one_training_per_partition()
    for training_id in trainings:  # they run until stopped
        await start_training(redis, training_id, digits_config(rounds=100_000, clients_per_round=4, min_clients=2))
    leases = [KEYS.coordinator_lease_of(p, PARTITIONS) for p in range(PARTITIONS)]

    async def holders() -> list[bytes | None]:
        return [await redis.get(lease) for lease in leases]

    async def split_in_turn() -> bool:  # members in name order take the partitions in turn
        return await holders() == [b"coordinator-0", b"coordinator-1"] * (PARTITIONS // 2)

    async def all_with_the_survivor() -> bool:
        return await holders() == [b"coordinator-0"] * PARTITIONS

    async def committed() -> list[int]:
        return [await redis.hlen(KEYS.versions(t)) for t in trainings]

    async def each_goes_on() -> None:
        before = await committed()

        async def every_training_committed_another_round() -> bool:
            return all(now > then for now, then in zip(await committed(), before, strict=True))
        await wait_until(every_training_committed_another_round, "every partition's training commits rounds", 60)

    await wait_until(split_in_turn, "each coordinator holds its half of the partitions")
    await each_goes_on()
    await system.kill("coordinator:1")  # cancelled mid-flight: its leases expire
    await wait_until(all_with_the_survivor, "the survivor takes the dead coordinator's partitions")
    await each_goes_on()
    await system.start("coordinator:1")
    await wait_until(split_in_turn, "the restarted coordinator gets its partitions back")
    await each_goes_on()

    for training_id in trainings:
        await redis.xadd(KEYS.control_stream, encode(StopTraining(training_id=training_id)))  # type: ignore[arg-type]
    for training_id in trainings:
        done = await wait_for_status(redis, training_id, {"stopped", "failed"})
        assert done.status == "stopped", (training_id, done.reason)
        records = [VersionRecord.model_validate_json(raw)
                   for raw in (await redis.hgetall(KEYS.versions(training_id))).values()]
        rounds = sorted(r.round for r in records if r.version > 0)
        assert rounds == list(range(1, len(rounds) + 1)), f"{training_id}: each round committed once"
    assert "coordinator coordinator-0 (partition p1 of 4) holds the lease" in caplog.messages
    assert any(m.startswith("coordinator coordinator-0 (partition p1 of 4) hands its partition over to coordinator-1")
               for m in caplog.messages), "the partition went back to its assigned coordinator"


async def test_a_coordinator_that_signs_in_but_never_takes_its_partitions_gets_none(
        redis: aioredis.Redis, system, make_agents, settings: Settings) -> None:
    """A hung process (alive enough to sign in, not to work) is assigned partitions by name order;
    the live one takes them once they stay free, and never hands them to it."""
    system.settings = settings.model_copy(update={"coordinator_partitions": 2})
    hung = Membership(redis, KEYS.coordinators, "coordinator-00", ttl_s=settings.coordinator_lease_s)
    await hung.beat()  # first in name order: partition 0 is assigned to it
    keep_signing_in = asyncio.create_task(_beat_until_cancelled(hung))
    try:
        await system.start("coordinator", "aggregator", "privacy", "versions", "monitor")
        await make_agents(4)
        training_id = next(t for t in (f"hung-{k}" for k in range(100)) if partition_of(t, 2) == 0)
        await start_training(redis, training_id, digits_config(rounds=3, clients_per_round=4, min_clients=2))
        done = await wait_for_status(redis, training_id, {"completed", "failed"}, timeout_s=120)
        assert done.status == "completed", done.reason
        assert await redis.get(KEYS.coordinator_lease_of(0, 2)) == b"coordinator-0"
        assert hung.members == ("coordinator-0", "coordinator-00")
    finally:
        keep_signing_in.cancel()


async def _beat_until_cancelled(member: Membership) -> None:
    while True:
        await asyncio.sleep(0.2)
        await member.beat()
