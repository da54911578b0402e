"""What every service process shares: logging, metrics endpoint, health key, events, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from prometheus_client import Counter, start_http_server

from federated_learning.bus.blobs import BlobStore
from federated_learning.bus.connection import connect
from federated_learning.config import Settings
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import Event, Severity, encode

log = logging.getLogger(__name__)

HEALTH_TTL_S = 10
HEALTH_REFRESH_S = 2.0
EVENT_STREAM_MAXLEN = 100_000

REJECTED = Counter(
    "fl_rejected_inputs_total", "Inputs rejected by validation", ["service", "source", "reason"]
)


def setup_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {service}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def start_metrics_server(port: int) -> int:
    """Serve Prometheus metrics on ``port`` (0: any free port); return the bound port."""
    server, _thread = start_http_server(port, addr="127.0.0.1")
    return int(server.server_port)


@dataclass
class ServiceContext:
    """The connections and names a service is built from."""

    redis: aioredis.Redis
    settings: Settings
    service: str
    instance: str
    keys: Keys = field(init=False)
    blobs: BlobStore = field(init=False)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    metrics_port: int = 0

    def __post_init__(self) -> None:
        self.keys = Keys(self.settings.redis_key_prefix)
        self.blobs = BlobStore(self.redis, self.keys, max_bytes=self.settings.max_blob_bytes)

    @property
    def dead_letter_stream(self) -> str:
        return f"{self.settings.redis_key_prefix}:stream:dead:{self.service}"

    async def emit(self, kind: str, message: str = "", *, severity: Severity = Severity.INFO,
                   training_id: str | None = None, round: int | None = None,
                   agent_id: str | None = None, **data: object) -> None:
        """Publish an event on the event stream."""
        event = Event(kind=kind, source=self.service, severity=severity, message=message,
                      training_id=training_id, round=round, agent_id=agent_id, data=data)
        await self.redis.xadd(self.keys.event_stream, encode(event),  # type: ignore[arg-type]
                              maxlen=EVENT_STREAM_MAXLEN, approximate=True)

    async def reject(self, source: str, reason: str, detail: str, *,
                     severity: Severity = Severity.WARNING, **context: object) -> None:
        """Count a rejected input, and report it as an event; nothing else is disturbed."""
        REJECTED.labels(self.service, source, reason).inc()
        await self.redis.hincrby(self.keys.rejections, f"{source}:{reason}", 1)
        log.log(logging.INFO if severity is Severity.INFO else logging.WARNING,
                "rejected input from %s (%s): %s %s", source, reason, detail, context or "")
        await self.emit("input_rejected", f"{source}: {reason}: {detail}",
                        severity=severity,
                        training_id=_str_or_none(context.pop("training_id", None)),
                        round=_int_or_none(context.pop("round", None)),
                        agent_id=_str_or_none(context.pop("agent_id", None)),
                        source_stream=source, reason=reason, **context)

    async def refresh_health(self, **extra: object) -> None:
        record = {
            "service": self.service, "instance": self.instance, "pid": os.getpid(),
            "host": socket.gethostname(), "metrics_port": self.metrics_port, "at": time.time(),
            **extra,
        }
        await self.redis.set(self.keys.service_health(self.service, self.instance),
                             json.dumps(record), ex=HEALTH_TTL_S)

    async def health_loop(self, extra: Callable[[], dict[str, object]] | None = None) -> None:
        """Refresh the health key until stopped; survive bus outages."""
        while not self.stop.is_set():
            try:
                await self.refresh_health(**(extra() if extra else {}))
            except Exception as exc:  # a lost bus must not kill the process
                log.warning("health refresh failed: %s", exc)
            try:
                await asyncio.wait_for(self.stop.wait(), HEALTH_REFRESH_S)
            except TimeoutError:
                pass


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def install_stop_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def open_context(settings: Settings, service: str, instance: str, *,
                       redis_url: str | None = None) -> ServiceContext:
    """Connect to the bus (bounded retries) and start the metrics endpoint."""
    url = redis_url or os.environ.get("FL_REDIS_URL") or settings.redis_url
    if not url:
        raise SystemExit("no redis_url: start services through scripts/deploy-federated-learning.py "
                         "or set FL_REDIS_URL")
    redis = await connect(url, settings, attempts=settings.redis_connect_attempts)
    ctx = ServiceContext(redis=redis, settings=settings, service=service, instance=instance)
    port = settings.metrics_port(service, int(instance) if instance.isdigit() else 0)
    ctx.metrics_port = start_metrics_server(port)
    log.info("%s/%s connected; metrics on :%d", service, instance, ctx.metrics_port)
    return ctx


async def serve(ctx: ServiceContext, body: Callable[[], Awaitable[None]],
                health_extra: Callable[[], dict[str, object]] | None = None) -> None:
    """Run ``body`` and the health loop until SIGTERM; then close the connection."""
    install_stop_handlers(ctx.stop)
    health = asyncio.create_task(ctx.health_loop(health_extra))
    try:
        await body()
    finally:
        ctx.stop.set()
        await health
        try:
            await ctx.redis.delete(ctx.keys.service_health(ctx.service, ctx.instance))
        except Exception:  # best effort on the way out
            pass
        await ctx.redis.aclose()
        log.info("%s/%s stopped", ctx.service, ctx.instance)
