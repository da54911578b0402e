"""What lets several coordinator processes split the trainings: signs of life under the server's
clock, the deployment's fixed partition count, slots claimed atomically, and streams trimmed only
past what every partition's group has handled."""

from __future__ import annotations

import socket

import pytest
import redis.asyncio as aioredis

from federated_learning.bus.consumer import ensure_group, trim_consumed
from federated_learning.bus.membership import Membership
from federated_learning.config import SERVICE_PORT_OFFSETS, Settings
from federated_learning.protocol.keys import GROUP_COORDINATOR, Keys
from federated_learning.records.partitions import PartitionCountMismatch, pin_partition_count
from federated_learning.records.trainings import TrainingStore
from federated_learning.services.runtime import open_context
from tests.integration.conftest import wait_until

KEYS = Keys()


async def test_members_sign_in_and_out_and_the_silent_ones_drop_out(redis: aioredis.Redis) -> None:
    first, second = (Membership(redis, "test:members", name, ttl_s=1.0) for name in ("c-1", "c-0"))
    assert await first.beat() == ("c-1",)
    assert await second.beat() == ("c-0", "c-1")
    assert await Membership(redis, "test:members", "observer", ttl_s=1.0).look() == ("c-0", "c-1")
    await second.leave()
    assert second.members == ("c-1",) and await first.beat() == ("c-1",)
    await second.beat()

    async def only_the_beating_one_is_left() -> bool:  # c-1 stops beating; c-0 goes on
        return await second.beat() == ("c-0",)

    await wait_until(only_the_beating_one_is_left, "a member silent for its ttl drops out")


async def test_each_member_lives_for_its_own_ttl(redis: aioredis.Redis) -> None:
    patient = Membership(redis, "test:members", "slow", ttl_s=60.0)
    hurried = Membership(redis, "test:members", "fast", ttl_s=0.5)
    await patient.beat()

    async def the_hurried_one_sees_itself_alone_gone() -> bool:
        return await hurried.look() == ("slow",)

    await hurried.beat()
    await wait_until(the_hurried_one_sees_itself_alone_gone, "a short ttl expires without dropping a long one")


async def test_the_partition_count_is_fixed_at_the_first_start(redis: aioredis.Redis) -> None:
    await pin_partition_count(redis, KEYS, 4)
    await pin_partition_count(redis, KEYS, 4)
    with pytest.raises(PartitionCountMismatch, match="set it to 4"):
        await pin_partition_count(redis, KEYS, 2)


async def test_a_lost_record_is_read_back_from_the_partitions_groups(redis: aioredis.Redis) -> None:
    for partition in range(3):
        await ensure_group(redis, KEYS.control_stream, f"coordinator-p{partition}")
    with pytest.raises(PartitionCountMismatch, match="split into 3 coordinator partitions"):
        await pin_partition_count(redis, KEYS, 8)
    await pin_partition_count(redis, KEYS, 3)


async def test_a_deployment_from_before_partitions_has_one(redis: aioredis.Redis) -> None:
    await ensure_group(redis, KEYS.control_stream, GROUP_COORDINATOR)  # its coordinator read the stream
    with pytest.raises(PartitionCountMismatch, match="split into 1 coordinator partitions"):
        await pin_partition_count(redis, KEYS, 3)
    await pin_partition_count(redis, KEYS, 1)


async def test_slots_are_claimed_atomically_in_queue_order_and_a_holder_keeps_its_own(redis: aioredis.Redis) -> None:
    store = TrainingStore(redis, KEYS)
    await redis.rpush(KEYS.training_queue, "a", "b", "c", "d")
    assert not await store.claim_slot("c", 2), "a and b were queued first and fill the two slots"
    assert await store.claim_slot("b", 2), "b is within the free slots: a's partition starts a"
    await redis.lrem(KEYS.training_queue, 0, "b")
    assert await store.claim_slot("a", 2)
    await redis.lrem(KEYS.training_queue, 0, "a")
    assert not await store.claim_slot("c", 2), "a third training in two slots"
    assert await store.claim_slot("a", 2), "a training that holds a slot (a retried activation) keeps it"
    assert await store.active_ids() == ["a", "b"]


async def test_a_stream_read_by_several_groups_is_trimmed_past_what_all_have_handled(redis: aioredis.Redis) -> None:
    stream = "test:partitioned"
    for group in ("p0", "p1"):
        await ensure_group(redis, stream, group)
    ids = [await redis.xadd(stream, {"n": str(n)}) for n in range(300)]
    for group, count in (("p0", 300), ("p1", 120)):
        read = await redis.xreadgroup(group, "c", {stream: ">"}, count=count)
        await redis.xack(stream, group, *(entry_id for entry_id, _ in read[0][1]))

    assert not await trim_consumed(redis, stream, "p0", "p1", "p2"), "a group that does not exist yet"
    assert await trim_consumed(redis, stream, "p0", "p1")

    remaining = [entry_id for entry_id, _ in await redis.xrange(stream)]
    assert set(ids[120:]) <= set(remaining), "p1 has not handled these"
    assert ids[0] not in remaining


async def test_a_second_coordinator_on_the_same_host_serves_metrics_on_a_free_port(
        redis_url: str, settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        base = taken.getsockname()[1] - SERVICE_PORT_OFFSETS["coordinator"]
        with_base = settings.model_copy(update={"metrics_port_base": base})
        with pytest.raises(OSError):
            await open_context(with_base, "coordinator", "0", redis_url=redis_url)  # instance 0 owns it
        ctx = await open_context(with_base, "coordinator", "1", redis_url=redis_url)
        try:
            assert ctx.metrics_port not in (0, taken.getsockname()[1])
        finally:
            await ctx.redis.aclose()


@pytest.mark.parametrize("partitions", [1, 2])
async def test_a_read_is_handled_with_joins_before_update_notices(
        redis: aioredis.Redis, settings: Settings, partitions: int) -> None:
    """An HTTP client joins and sends its first update at once: when both come in one read, the
    join must be handled first, or the notice is refused as from an unknown agent."""
    from federated_learning.coordination.partitions import Partition
    from federated_learning.services.coordinator import Coordinator
    from federated_learning.services.runtime import ServiceContext

    split = settings.model_copy(update={"coordinator_partitions": partitions})
    ctx = ServiceContext(redis=redis, settings=split, service="coordinator", instance="0")
    streams = list(Coordinator(ctx, Partition(0, partitions)).consumer.streams)
    assert streams.index(KEYS.agent_stream) < streams.index(KEYS.update_stream), streams
    if partitions == 2:
        other = Coordinator(ctx, Partition(1, 2))
        assert KEYS.agent_stream not in other.consumer.streams
        cell = ctx.keys.in_cell(1)  # its versions, refusals and outbox come on streams of their own
        assert [list(consumer.streams) for consumer in other.consumers[1:]] == [
            [cell.version_stream, cell.refused_update_stream], [cell.outbox_stream]]

