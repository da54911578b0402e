"""What every service process shares: logging, metrics endpoint, health key, events, SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import psutil
import redis.asyncio as aioredis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import ThreadingWSGIServer
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from federated_learning.bus.blob_stores import (
    BlobStoreUnreachable,
    object_store_settings,
    services_blob_store,
)
from federated_learning.bus.blobs import BlobStore, BlobStoreError
from federated_learning.bus.connection import connect, keys_for
from federated_learning.bus.consumer import BatchHandler, Handler, StreamConsumer
from federated_learning.bus.replies import text
from federated_learning.bus.stream_ids import StreamRepair
from federated_learning.config import Settings, load_settings
from federated_learning.protocol.events import Event
from federated_learning.protocol.keys import (
    GROUP_AGGREGATOR,
    GROUP_FORWARDER,
    GROUP_MONITOR,
    GROUP_PRIVACY,
    GROUP_VERSIONS,
    Keys,
    coordinator_group,
)
from federated_learning.protocol.messages import (
    M,
    MalformedMessage,
    Severity,
    StreamFields,
    decode,
    encode,
)
from federated_learning.protocol.storage import read_descriptor
from federated_learning.records.partitions import recorded_partition_count
from federated_learning.records.trainings import TrainingViews

log = logging.getLogger(__name__)

HEALTH_TTL_S = 10
HEALTH_REFRESH_S = 2.0
EVENT_STREAM_MAXLEN = 100_000

CPU_WINDOW_S = 30.0
"""Health records report a process's CPU averaged over this many seconds, so a brief burst
(one large message) does not read as a process stuck at full load."""
CPU_MIN_SPAN_S = 0.25
"""Shortest span a CPU figure is computed over (0.0 before): right after start, one 10 ms tick of
CPU time over a fraction of a millisecond would read as thousands of percent; over 0.25 s it is
at most 4 points off."""

REJECTED = Counter(
    "fl_rejected_inputs_total", "Inputs rejected by validation", ["service", "source", "reason"]
)
LATE_UPDATES = Counter(
    "fl_late_updates_total", "Updates of over-selected agents that came after their round closed"
)
TRAINING_LABEL = "training"
PER_TRAINING: list[Gauge] = []
"""Gauges of this process labelled by training alone (see :func:`per_training`)."""


def setup_logging(level: str, service: str) -> None:
    """Start-up every service process goes through first: the log format, and Prometheus
    series without ``_created`` (a second series per counter and histogram that no panel or
    rule reads)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {service}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def exposition() -> tuple[bytes, str]:
    """Every metric of this process and its content type: the Prometheus text format 0.0.4, the
    one format every process serves (the dashboard's ``/metrics`` and the services' ports alike),
    whatever the scraper's Accept header asks for."""
    return generate_latest(), CONTENT_TYPE_LATEST


def _metrics_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    body, content_type = exposition()
    start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one line per scrape every few seconds)."""


def start_metrics_server(port: int) -> int:
    """Serve :func:`exposition` on ``127.0.0.1:port`` (0: any free port) from a daemon thread;
    return the bound port."""
    server = make_server("127.0.0.1", port, _metrics_app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return int(server.server_port)


def per_training(gauge: Gauge) -> Gauge:
    """Register ``gauge`` (labelled by ``training`` alone) so finished trainings leave it:
    :meth:`ServiceContext.health_loop` drops their series (see :func:`prune_finished_trainings`)."""
    PER_TRAINING.append(gauge)
    return gauge


def labelled_trainings(gauges: Iterable[Gauge]) -> set[str]:
    """The training ids that have a series in any of ``gauges``."""
    return {sample.labels[TRAINING_LABEL] for gauge in gauges for family in gauge.collect()
            for sample in family.samples if TRAINING_LABEL in sample.labels}


def forget_training(training_id: str, gauges: Iterable[Gauge]) -> None:
    """Drop ``training_id``'s series from ``gauges`` (those without one are left as they are)."""
    for gauge in gauges:
        if training_id in labelled_trainings([gauge]):
            gauge.remove(training_id)


async def prune_finished_trainings(trainings: TrainingViews, gauges: Sequence[Gauge]) -> set[str]:
    """Drop from ``gauges`` the series of trainings that reached a final status (or are gone);
    return their ids. One read per training with a series: there are few."""
    finished = set()
    for training_id in sorted(labelled_trainings(gauges)):
        state = await trainings.get(training_id)
        if state is None or state.status.is_final:
            forget_training(training_id, gauges)
            finished.add(training_id)
    return finished


@dataclass
class CpuWindow:
    """A process's CPU use over the last ``window_s`` seconds, in percent of one core.

    Fed (wall seconds, CPU seconds) samples, e.g. ``time.monotonic()`` and user + system time:
    100 * (cpu_now - cpu_then) / (now - then), where ``then`` is the newest sample at least
    ``window_s`` old (the oldest kept while there is none). Above 100 when the process keeps
    several cores busy; a single-threaded process saturates at 100.
    """

    window_s: float = CPU_WINDOW_S
    samples: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, at_s: float, cpu_s: float) -> float:
        """Record a sample; return the percent of one core since the window's start (0.0 until
        the window spans ``CPU_MIN_SPAN_S``)."""
        self.samples.append((at_s, cpu_s))
        while len(self.samples) > 2 and at_s - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        start_s, start_cpu_s = self.samples[0]
        if at_s - start_s < CPU_MIN_SPAN_S:  # CPU time ticks in 10 ms steps: a short span says nothing
            return 0.0
        return max(0.0, 100.0 * (cpu_s - start_cpu_s) / (at_s - start_s))


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
    process: psutil.Process = field(init=False, repr=False)
    cpu_window: CpuWindow = field(default_factory=CpuWindow, init=False, repr=False)

    def __post_init__(self) -> None:
        self.keys = keys_for(self.redis, self.settings.redis_key_prefix, self.settings.coordinator_partitions)
        self.blobs = services_blob_store(self.redis, self.keys, max_bytes=self.settings.max_blob_bytes,
                                         blob_dir=self.settings.blob_dir,
                                         object_store=object_store_settings(self.settings))
        self.process = psutil.Process()
        self.cpu_window.add(time.monotonic(), self._cpu_seconds())

    @property
    def dead_letter_stream(self) -> str:
        return self.keys.dead_letters(self.service)

    def cell_consumers(self, group: str, stream_of: Callable[[Keys], str], handler: Handler, *,
                       batch_handler: BatchHandler | None = None, count: int = 32) -> list[StreamConsumer]:
        """One consumer of ``group`` per cell (``protocol/keys.py``), each reading that cell's
        ``stream_of`` stream (a cluster serves one hash slot per read); run them with
        :func:`~federated_learning.bus.consumer.run_consumers`."""
        consumers = []
        for cell in self.keys.cells:
            stream = stream_of(cell)
            consumers.append(StreamConsumer(
                self.redis, group, f"{self.service}-{self.instance}", {stream: handler},
                batch_handlers={stream: batch_handler} if batch_handler is not None else None,
                dead_letter_stream=self.dead_letter_stream, count=count,
                claim_idle_ms=self.settings.claim_idle_ms, on_forged_id=self.forged_stream_id))
        return consumers

    def _event(self, kind: str, message: str, severity: Severity, training_id: str | None, round: int | None,
               agent_id: str | None, data: dict[str, object]) -> StreamFields:
        return encode(Event(kind=kind, source=self.service, severity=severity, message=message,
                            training_id=training_id, round=round, agent_id=agent_id, data=data))

    async def emit(self, kind: str, message: str = "", *, severity: Severity = Severity.INFO,
                   training_id: str | None = None, round: int | None = None,
                   agent_id: str | None = None, **data: object) -> None:
        """Publish an event on the event stream (of the training's cell)."""
        await self.redis.xadd(self.event_stream_of(training_id),
                              self._event(kind, message, severity, training_id, round, agent_id, data),
                              maxlen=EVENT_STREAM_MAXLEN, approximate=True)

    def event_stream_of(self, training_id: str | None) -> str:
        """The event stream of ``training_id``'s cell (``protocol/keys.py``); the deployment's for
        events of no training."""
        return (self.keys if training_id is None else self.keys.for_training(training_id)).event_stream

    def stage_emit(self, pipe: Pipeline, kind: str, message: str = "", *, severity: Severity = Severity.INFO,
                   training_id: str | None = None, round: int | None = None,
                   agent_id: str | None = None, **data: object) -> None:
        """Add an event to ``pipe``: published with the writes it reports, or not at all (on the
        stream of the training's cell, the slot of a step's transaction)."""
        pipe.xadd(self.event_stream_of(training_id),
                  self._event(kind, message, severity, training_id, round, agent_id, data),
                  maxlen=EVENT_STREAM_MAXLEN, approximate=True)

    def stage_deployment_emit(self, pipe: Pipeline, kind: str, message: str = "", *,
                              severity: Severity = Severity.INFO, training_id: str | None = None,
                              **data: object) -> None:
        """:meth:`stage_emit` on the deployment's event stream, for a transaction that writes the
        deployment's keys (alerts); the readers read every cell's stream."""
        pipe.xadd(self.keys.global_keys.event_stream, self._event(kind, message, severity, training_id, None, None, data),
                  maxlen=EVENT_STREAM_MAXLEN, approximate=True)

    async def decoded(self, model: type[M], fields: dict[bytes, bytes], source: str) -> M | None:
        """A stream entry as ``model``, or None after rejecting it as ``<source>:malformed``."""
        try:
            return decode(model, fields)
        except MalformedMessage as exc:
            await self.reject(source, "malformed", exc.reason)
            return None

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

    async def forged_stream_id(self, repair: StreamRepair) -> None:
        """Count and report a stream whose last id a writer chose (the consumer has repaired it):
        source is the stream's own name (``agents``, ``updates``...), reason ``forged_stream_id``."""
        await self.reject(repair.stream.rsplit(":", 1)[-1], "forged_stream_id", repair.describe(),
                          stream=repair.stream, forged_id=repair.forged_id, moved=len(repair.moved),
                          reset_to=repair.reset_to)

    async def late_update(self, detail: str, *, training_id: str, round: int, agent_id: str) -> None:
        """Count an update that came just after its round closed, and report it as an INFO
        ``late_update`` event. Over-selection asks more agents than a round waits for, so the
        slowest answers come late by design: that is not a rejected input."""
        LATE_UPDATES.inc()
        log.info("late update from agent %s for training %s round %d: %s", agent_id, training_id, round, detail)
        await self.emit("late_update", detail, training_id=training_id, round=round, agent_id=agent_id)

    async def refresh_health(self, **extra: object) -> None:
        record = {
            "service": self.service, "instance": self.instance, "pid": os.getpid(),
            "host": socket.gethostname(), "metrics_port": self.metrics_port, "at": time.time(),
            **self.resource_usage(), **extra,
        }
        await self.redis.set(self.keys.service_health(self.service, self.instance),
                             json.dumps(record), ex=HEALTH_TTL_S)

    def _cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def resource_usage(self) -> dict[str, float | int]:
        """This process's CPU in percent of one core over the last ``CPU_WINDOW_S`` (see
        :class:`CpuWindow`), its resident memory in bytes, and that memory as percent of RAM."""
        with self.process.oneshot():
            cpu = self.cpu_window.add(time.monotonic(), self._cpu_seconds())
            rss = int(self.process.memory_info().rss)
            memory = float(self.process.memory_percent("rss"))
        return {"cpu_percent": round(cpu, 1), "rss_bytes": rss, "memory_percent": round(memory, 2)}

    async def health_loop(self, extra: Callable[[], dict[str, object]] | None = None) -> None:
        """Refresh the health key, and drop finished trainings' gauge series, until stopped;
        survive bus outages."""
        trainings = TrainingViews(self.redis, self.keys)
        while not self.stop.is_set():
            try:
                await self.refresh_health(**(extra() if extra else {}))
            except Exception as exc:  # noqa: BLE001 - a lost bus must not kill the process
                log.warning("health refresh failed: %s", exc)
            try:
                await prune_finished_trainings(trainings, PER_TRAINING)
            except Exception as exc:  # noqa: BLE001 - the next pass retries
                log.warning("dropping finished trainings' metrics failed: %s", exc)
            try:
                await asyncio.wait_for(self.stop.wait(), HEALTH_REFRESH_S)
            except TimeoutError:
                pass


async def read_health_records(redis: aioredis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """The live health records (one per service instance), as the services wrote them."""
    records = []
    async for key in redis.scan_iter(match=keys.service_health_pattern, count=200):
        raw = await redis.get(key)
        if raw:
            records.append(json.loads(raw))
    return records


@dataclass(frozen=True)
class StreamBacklog:
    """A service stream, the group that consumes it, its length and its pending
    (delivered, unacknowledged) entry count."""

    stream: str
    group: str
    length: int
    pending: int

    @property
    def name(self) -> str:
        return f"{self.stream}/{self.group}"


def service_streams(keys: Keys, coordinator_partitions: int = 1) -> list[tuple[str, str]]:
    """(stream, group) for every stream a pipeline service consumes: the deployment's control and
    update streams once per partition's group (``coordination/partitions.py``), the agents' by the
    first only, then each cell's streams (``protocol/keys.py``), the versions and refusals by their
    partition's coordinator."""
    coordinators = [coordinator_group(k, coordinator_partitions) for k in range(coordinator_partitions)]
    pairs = [
        *((stream, group) for stream in (keys.control_stream, keys.update_stream) for group in coordinators),
        (keys.agent_stream, coordinators[0]),
    ]
    cells = Keys(keys.prefix, cluster=keys.cluster, partitions=coordinator_partitions).cells
    for cell, group in zip(cells, coordinators, strict=True):
        pairs += [(cell.version_stream, group), (cell.refused_update_stream, group),
                  (cell.accepted_update_stream, GROUP_AGGREGATOR), (cell.job_stream, GROUP_AGGREGATOR),
                  (cell.aggregate_stream, GROUP_PRIVACY), (cell.release_stream, GROUP_VERSIONS),
                  (cell.event_stream, GROUP_MONITOR)]
        if cell.cell != 0:
            pairs.append((cell.outbox_stream, GROUP_FORWARDER))
    return pairs


async def read_backlogs(redis: aioredis.Redis, keys: Keys) -> list[StreamBacklog]:
    """Length and pending count of each service stream's group, in one round trip after the
    partition count's; a stream or group that does not exist yet counts as empty."""
    pairs = service_streams(keys, await recorded_partition_count(redis, keys))
    async with redis.pipeline(transaction=False) as pipe:
        for stream, _group in pairs:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        replies = await pipe.execute(raise_on_error=False)
    backlogs = []
    for (stream, group), length, groups in zip(pairs, replies[::2], replies[1::2], strict=True):
        if isinstance(groups, ResponseError) and "no such key" in str(groups).lower():
            groups = []
        for reply in (length, groups):
            if isinstance(reply, Exception):
                raise reply
        pending = sum(int(g["pending"]) for g in groups if g["name"] in (group, group.encode()))
        backlogs.append(StreamBacklog(stream, group, int(length), pending))
    return backlogs


async def read_redis_memory(redis: aioredis.Redis) -> tuple[int, int]:
    """(used_memory, maxmemory) in bytes from INFO memory; maxmemory 0 means unlimited."""
    memory = await redis.info("memory")
    return int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def install_stop_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def _serve_metrics(settings: Settings, service: str, instance: str) -> int:
    """Start the metrics endpoint on the service's port; the bound port."""
    port = settings.metrics_port(service, int(instance) if instance.isdigit() else 0)
    try:
        return start_metrics_server(port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or service == "aggregator" or instance == "0":
            raise
    # Another instance of this service on this host (a standby coordinator, say) has the service's
    # port: take any free one; the health record says which.
    log.warning("%s/%s: metrics port %d is taken (by instance 0?); serving metrics on a free port",
                service, instance, port)
    return start_metrics_server(0)


async def open_context(settings: Settings, service: str, instance: str, *,
                       redis_url: str | None = None) -> ServiceContext:
    """Connect to the bus (bounded retries) and start the metrics endpoint."""
    url = redis_url or os.environ.get("FL_REDIS_URL") or settings.redis_url
    if not url:
        raise SystemExit("no redis_url: start services through scripts/deploy-federated-learning.py "
                         "or set FL_REDIS_URL")
    redis = await connect(url, settings, attempts=settings.redis_connect_attempts)
    try:
        ctx = ServiceContext(redis=redis, settings=settings, service=service, instance=instance)
    except (BlobStoreError, BlobStoreUnreachable) as exc:  # a bucket or folder it cannot use
        await redis.aclose()
        raise SystemExit(f"{service}/{instance}: cannot open the deployment's blob store: {exc}") from exc
    try:
        await check_partition_count(ctx)
        await warn_if_another_blob_store(ctx)
        ctx.metrics_port = _serve_metrics(settings, service, instance)
    except BaseException:
        await redis.aclose()
        raise
    log.info("%s/%s connected; metrics on :%d", service, instance, ctx.metrics_port)
    return ctx


async def check_partition_count(ctx: ServiceContext) -> None:
    """Stop with the reason when the deployment's recorded partition count is not this service's
    ``coordinator_partitions``: it would read and write the wrong cells' streams."""
    recorded = await ctx.redis.get(ctx.keys.coordinator_partitions)
    if recorded is not None and int(text(recorded)) != ctx.settings.coordinator_partitions:
        raise SystemExit(f"{ctx.service}/{ctx.instance}: this deployment's trainings are split into {text(recorded)} "
                         f"coordinator partitions, and this service was started with coordinator_partitions="
                         f"{ctx.settings.coordinator_partitions}: give every service the same count")


async def warn_if_another_blob_store(ctx: ServiceContext) -> None:
    """Say so when this service's blob store is not the one the coordinator published (another
    ``blob_dir``, or the folder not mounted here): its reads would miss and its writes be lost."""
    published = await ctx.redis.get(ctx.keys.blob_store)
    if published is not None and read_descriptor(published) != ctx.blobs.describe():
        log.error("%s/%s keeps blobs in %s, but the deployment's coordinator published %s: give every "
                  "service the same blob_dir (mounted at the same path) or blob_bucket", ctx.service, ctx.instance,
                  ctx.blobs.describe().model_dump_json(), text(published))


SHUTDOWN_GRACE_S = 5.0
"""How long a stopping service lets its current work finish before cancelling it."""


async def finish_within(task: asyncio.Future[None], seconds: float) -> None:
    """Wait up to ``seconds`` for ``task``, then cancel it and wait for the cancellation."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def serve(ctx: ServiceContext, body: Callable[[], Awaitable[None]],
                health_extra: Callable[[], dict[str, object]] | None = None) -> None:
    """Run ``body`` and the health loop until SIGTERM; then close the connection.

    After SIGTERM the body gets ``SHUTDOWN_GRACE_S`` to finish the entry it is handling and is
    then cancelled: with the bus gone its calls could retry far longer than the supervisor
    waits, and a cancelled handler is safe (its entry stays pending and is handled again).
    """
    install_stop_handlers(ctx.stop)
    health = asyncio.create_task(ctx.health_loop(health_extra))
    work = asyncio.ensure_future(body())
    stopped = asyncio.create_task(ctx.stop.wait())
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        await finish_within(work, SHUTDOWN_GRACE_S)
        if not work.cancelled():
            work.result()
    finally:
        ctx.stop.set()
        stopped.cancel()
        await finish_within(health, 1.0)
        try:  # best effort on the way out
            await asyncio.wait_for(ctx.redis.delete(ctx.keys.service_health(ctx.service, ctx.instance)), 1.0)
        except Exception:  # noqa: BLE001, S110 - the bus may be gone; the key expires anyway
            pass
        await ctx.redis.aclose()
        log.info("%s/%s stopped", ctx.service, ctx.instance)


def service_main(service: str, description: str, body: Callable[[ServiceContext], Callable[[], Awaitable[None]]], *,
                 prepare: Callable[[Settings, str], None] | None = None, per_instance_log: bool = False,
                 fatal: tuple[type[Exception], ...] = ()) -> None:
    """A service process's ``main``: ``--config`` and ``--instance``, the settings, logging,
    ``prepare(settings, instance)`` (process set-up before the bus), the context, and
    :func:`serve` of ``body(ctx)``. An exception of a ``fatal`` type is logged and ends the process
    with status 2 (the supervisor does not restart a service that cannot run as configured)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--instance", default="0")
    args = parser.parse_args()

    async def run() -> None:
        settings = load_settings(args.config)
        setup_logging(settings.log_level, f"{service}-{args.instance}" if per_instance_log else service)
        if prepare is not None:
            prepare(settings, args.instance)
        ctx = await open_context(settings, service, args.instance)
        try:
            await serve(ctx, body(ctx))
        except fatal as exc:
            log.error("%s/%s cannot run: %s", service, args.instance, exc)
            raise SystemExit(2) from exc

    asyncio.run(run())
