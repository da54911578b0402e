"""Read-only probes of a running deployment for end-to-end checks: Prometheus text, stream
positions, and a snapshot of the state a refused request must leave unchanged."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from federated_learning.bus.replies import text
from federated_learning.protocol.keys import Keys


def metric_total(exposition: str, name: str) -> float:
    """Sum of the samples of metric ``name`` (any labels) in Prometheus text ``exposition``."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        sample, _, value = line.rpartition(" ")
        if sample.split("{", 1)[0] == name:
            total += float(value)
    return total


def fl_samples(exposition: str) -> list[str]:
    """The sample lines (not comments) of metrics named ``fl_*``."""
    return [line for line in exposition.splitlines() if line.startswith("fl_")]


async def stream_last_id(redis: aioredis.Redis, stream: str) -> str:
    """The id of the newest entry ever added to ``stream`` (trimming does not move it); '' if none."""
    try:
        info = await redis.xinfo_stream(stream)
    except ResponseError:  # no such key
        return ""
    return text(info["last-generated-id"])


async def hash_digest(redis: aioredis.Redis, key: str) -> str:
    """SHA-256 over a hash's sorted fields and values (its whole content, compared cheaply)."""
    items = sorted((text(k), text(v)) for k, v in (await redis.hgetall(key)).items())
    return hashlib.sha256(repr(items).encode()).hexdigest()


async def bus_snapshot(redis: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    """What a refused command or sync must not touch on the bus: the control, agent and update
    streams' newest ids, the registered agents, the API keys and the join tokens."""
    return {
        "control_stream": await stream_last_id(redis, keys.control_stream),
        "agent_stream": await stream_last_id(redis, keys.agent_stream),
        "update_stream": await stream_last_id(redis, keys.update_stream),
        "agents": sorted(text(agent) for agent in await redis.hkeys(keys.agents)),
        "api_keys": await hash_digest(redis, keys.api_keys),
        "join_tokens": await hash_digest(redis, keys.join_tokens),
    }


async def training_snapshot(http: httpx.AsyncClient, training_id: str) -> dict[str, Any]:
    """A training's status, versions and metrics as the (bootstrap-keyed) ``http`` client reads them."""
    snapshot: dict[str, Any] = {}
    for part in ("status", "versions", "metrics"):
        response = await http.get(f"/api/training/{training_id}/{part}")
        body = response.json() if response.status_code == 200 else None
        if part == "status" and isinstance(body, dict):
            body.pop("model_refusals", None)  # a refused sync is reported there, by design
        snapshot[part] = (response.status_code, body)
    return snapshot


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The top-level entries that differ between two snapshots."""
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
