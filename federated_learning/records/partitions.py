"""How many partitions a deployment's trainings are split into (``coordination/partitions.py``):
chosen at its first start and fixed after, since a training's partition follows from the count."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from federated_learning.bus.replies import text
from federated_learning.protocol.keys import GROUP_COORDINATOR, Keys


class PartitionCountMismatch(RuntimeError):
    """A coordinator was started with another partition count than its deployment's."""


async def recorded_partition_count(redis: aioredis.Redis, keys: Keys) -> int:
    """How many partitions the deployment's coordinators split the trainings into (1 before the
    first coordinator records it)."""
    return int(await redis.get(keys.coordinator_partitions) or 1)


async def pin_partition_count(redis: aioredis.Redis, keys: Keys, partitions: int) -> None:
    """Record ``partitions`` as the deployment's count, or check it is the recorded one.

    Without a record the count is read from the coordinators' groups on the control stream (a
    deployment from before partitions has the group ``coordinator``: one partition). Coordinators
    check it again with every sign of life, so a record lost meanwhile is written again.
    """
    recorded = await redis.get(keys.coordinator_partitions)
    if recorded is None:
        count = await _count_from_groups(redis, keys) or partitions
        await redis.set(keys.coordinator_partitions, str(count), nx=True)
        recorded = await redis.get(keys.coordinator_partitions)
    if recorded is not None and int(text(recorded)) != partitions:
        raise PartitionCountMismatch(
            f"this deployment's trainings are split into {text(recorded)} coordinator partitions, and a "
            f"coordinator was started with coordinator_partitions={partitions}: set it to {text(recorded)} "
            "(the count is fixed once a deployment has started)")


async def _count_from_groups(redis: aioredis.Redis, keys: Keys) -> int | None:
    """The partition count the coordinators' groups on the control stream show, when the record is
    missing (a deployment from before partitions, or a lost key): 1 for the group ``coordinator``,
    else one more than the highest ``coordinator-p<k>``; None for a new deployment."""
    try:
        groups = [text(group["name"]) for group in await redis.xinfo_groups(keys.control_stream)]
    except ResponseError:  # no control stream yet
        return None
    if GROUP_COORDINATOR in groups:
        return 1
    prefix = f"{GROUP_COORDINATOR}-p"
    indexes = [int(name[len(prefix):]) for name in groups
               if name.startswith(prefix) and name[len(prefix):].isdigit()]
    return max(indexes) + 1 if indexes else None
