"""The version index in Redis: version -> record, round -> version."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import VersionRecord


class VersionIndex:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def version_of_round(self, training_id: str, round_number: int) -> int | None:
        raw = await self._redis.hget(self._keys.version_by_round(training_id), str(round_number))
        return None if raw is None else int(raw)

    async def next_version(self, training_id: str) -> int:
        return int(await self._redis.hlen(self._keys.versions(training_id)))

    async def get(self, training_id: str, version: int) -> VersionRecord | None:
        raw = await self._redis.hget(self._keys.versions(training_id), str(version))
        return None if raw is None else VersionRecord.model_validate_json(raw)

    async def history(self, training_id: str) -> list[VersionRecord]:
        raw = await self._redis.hgetall(self._keys.versions(training_id))
        records = [VersionRecord.model_validate_json(v) for v in raw.values()]
        return sorted(records, key=lambda r: r.version)

    def stage_commit(self, pipe: Pipeline, record: VersionRecord) -> None:
        pipe.hset(self._keys.versions(record.training_id), str(record.version), record.model_dump_json())
        pipe.hset(self._keys.version_by_round(record.training_id), str(record.round), str(record.version))
