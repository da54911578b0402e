"""How many partitions a deployment's trainings are split into (``coordination/partitions.py``):
chosen at its first start and fixed after, since a training's partition follows from the count."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from federated_learning.bus.replies import text
from federated_learning.protocol.keys import GROUP_COORDINATOR, Keys


class PartitionCountMismatch(RuntimeError):
    """A coordinator was started with another partition count than its deployment's."""


async def pin_partition_count(redis: aioredis.Redis, keys: Keys, partitions: int) -> None:
    """Record ``partitions`` as the deployment's count, or check it is the recorded one.

    A deployment from before partitions (its coordinators read the control stream in the group
    ``coordinator``, and no count is recorded) has one partition.
    """
    recorded = await redis.get(keys.coordinator_partitions)
    if recorded is None:
        count = 1 if await _has_coordinator_group(redis, keys) else partitions
        await redis.set(keys.coordinator_partitions, str(count), nx=True)
        recorded = await redis.get(keys.coordinator_partitions)
    if recorded is not None and int(text(recorded)) != partitions:
        raise PartitionCountMismatch(
            f"this deployment's trainings are split into {text(recorded)} coordinator partitions, and a "
            f"coordinator was started with coordinator_partitions={partitions}: set it to {text(recorded)} "
            "(the count is fixed once a deployment has started)")


async def _has_coordinator_group(redis: aioredis.Redis, keys: Keys) -> bool:
    try:
        groups = await redis.xinfo_groups(keys.control_stream)
    except ResponseError:  # no control stream yet
        return False
    return any(text(group["name"]) == GROUP_COORDINATOR for group in groups)
