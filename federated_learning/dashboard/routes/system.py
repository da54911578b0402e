"""Health of the dashboard itself and of the whole system; agents; alerts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import asdict
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from federated_learning.access import Principal, org_of_training
from federated_learning.bus.replies import text
from federated_learning.dashboard.auth import ApiKey, Viewer, forbid
from federated_learning.dashboard.deps import Agents, AppKeys, Context, Redis
from federated_learning.monitoring.alerts import (
    RECONCILED_RULES,
    Alert,
)
from federated_learning.monitoring.reliability import leaderboard as rank_agents
from federated_learning.training_monitor import TrainingMonitor

router = APIRouter(prefix="/api", tags=["system"])
T = TypeVar("T")

BUS_TIMEOUT_S = 2.0
"""How long the health routes wait for the bus: its client retries a lost connection for
about 16 s per command, which a prober must not wait out."""


class BusUnreachable(Exception):
    """The bus did not answer a health route within ``BUS_TIMEOUT_S``."""


async def _within_bus_timeout(call: Awaitable[T]) -> T:
    """``call``'s result, or :class:`BusUnreachable` with the cause when the bus does not
    answer within ``BUS_TIMEOUT_S`` seconds or the connection fails."""
    try:
        return await asyncio.wait_for(call, BUS_TIMEOUT_S)
    except TimeoutError as exc:
        raise BusUnreachable(f"bus unreachable: no answer within {BUS_TIMEOUT_S:.0f}s") from exc
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise BusUnreachable(f"bus unreachable: {exc}") from exc


@router.get("/health", response_model=None)
async def health(redis: Redis) -> dict[str, Any] | JSONResponse:
    """The dashboard is up and reaches the bus (503 with the reason when it does not)."""
    try:
        await _within_bus_timeout(redis.ping())
    except BusUnreachable as exc:
        return JSONResponse({"status": "bus unreachable", "reason": str(exc), "time": time.time()},
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return {"status": "ok", "time": time.time()}


@router.get("/system/health", response_model=None)
async def system_health(redis: Redis, keys: AppKeys) -> dict[str, Any] | JSONResponse:
    """Each service's instances with their age, CPU and memory; Redis memory; stream backlogs;
    and a verdict from the monitor's system rules, with the reasons. While the bus does not
    answer: 503, ``critical``, with the reason ``bus unreachable`` (within ``BUS_TIMEOUT_S``).

    Open without a key, like ``/metrics``: it is the deployment's health (what the launcher and
    probes poll), holding no organisation's data."""
    try:
        return await _within_bus_timeout(TrainingMonitor(redis, keys).get_system_health())
    except BusUnreachable as exc:
        return JSONResponse({"health_status": "critical", "reasons": [str(exc)], "services": {},
                             "streams": [], "redis": None},
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


@router.get("/agents")
async def list_agents(agents: Agents, redis: Redis, keys: AppKeys, principal: Viewer) -> list[dict[str, Any]]:
    """The agents of the key's organisation (every agent for the bootstrap key)."""
    last_seen = await agents.last_seen()
    alive = set(await agents.alive())
    dropouts = {text(k): int(v) for k, v in (await redis.hgetall(keys.agent_dropouts)).items()}
    return [
        {**record.model_dump(mode="json", exclude={"public_key"}), "alive": record.agent_id in alive,
         "last_seen": last_seen.get(record.agent_id), "dropouts": dropouts.get(record.agent_id, 0)}
        for record in sorted(await agents.all(), key=lambda r: r.agent_id)
        if principal.may_access(record.org_id)
    ]


@router.get("/alerts", response_model=list[Alert])
async def alerts(redis: Redis, keys: AppKeys, principal: Viewer, training_id: str | None = None,
                 severity: Literal["info", "warning", "critical"] | None = None,
                 open_only: bool = Query(default=False)) -> list[Alert]:
    found = await TrainingMonitor(redis, keys).get_alerts(training_id, severity, open_only=open_only)
    return [a for a in found if _visible(principal, a)]


@router.post("/alerts/{alert_id}/acknowledge", response_model=Alert)
async def acknowledge(alert_id: str, ctx: Context, redis: Redis, keys: AppKeys, principal: ApiKey) -> Alert:
    """Mark an alert as seen by an operator (it stays open until its condition is gone)."""
    raw = await redis.hget(keys.alerts, alert_id)
    if raw is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no alert '{alert_id}'")
    alert = Alert.model_validate_json(raw)
    if not _visible(principal, alert):
        await forbid(ctx, principal, f"alert '{alert_id}' is not about a training of this key's organisation")
    update: dict[str, object] = {"acknowledged": True}
    if alert.rule not in RECONCILED_RULES and alert.is_open:
        update["resolved_at"] = time.time()
    alert = alert.model_copy(update=update)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.alerts, alert_id, alert.model_dump_json())
        if alert.resolved_at is not None:
            pipe.hdel(keys.open_alerts, alert.key)
        await pipe.execute()
    return alert


@router.get("/agents/leaderboard")
async def leaderboard(agents: Agents, principal: Viewer,
                      top: int = Query(default=20, ge=1, le=10_000)) -> list[dict[str, Any]]:
    """Agents (of the key's organisation) ranked by reliability (completion, lateness, anomaly
    flags), then contribution."""
    own = {r.agent_id for r in await agents.all() if principal.may_access(r.org_id)}
    stats = {agent: row for agent, row in (await agents.statistics()).items() if agent in own}
    return [{**asdict(row.stats), "rank": row.rank, "agent_id": row.agent_id,
             "reliability": round(row.reliability, 4), "contribution": round(row.contribution, 4)}
            for row in rank_agents(stats, top)]


def _visible(principal: Principal, alert: Alert) -> bool:
    """An organisation's key sees the alerts about its trainings; system alerts only the bootstrap key."""
    if principal.is_super:
        return True
    return alert.training_id is not None and principal.may_access(org_of_training(alert.training_id))
