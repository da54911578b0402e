"""The live stream: one reader of the event stream fans events out to WebSocket subscribers.

Each subscriber has a bounded queue; when a slow client's queue is full its events
are dropped (and counted, then reported to it), so no client can slow the system.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from federated_learning.access import org_of_training
from federated_learning.bus.replies import read_batches
from federated_learning.protocol.events import Event
from federated_learning.protocol.messages import MalformedMessage, decode

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
ALL = "*"

PUSHED_KINDS = {
    "round_completed": ("round_completed", "metric_update"),
    "alert": ("alert",),
    "alert_resolved": ("alert_resolved",),
    "training_completed": ("training_completed",),
    "training_status": ("training_status",),
    "version_committed": ("version_committed",),
    "rollback": ("rollback",),
    "agent_joined": ("agent_update",),
    "agent_left": ("agent_update",),
    "agent_dropped": ("agent_update",),
}

SOCKETS = Gauge("fl_dashboard_websockets", "Open WebSocket connections")
DROPPED = Counter("fl_dashboard_ws_dropped_total", "Events dropped for slow WebSocket clients")


def to_pushes(event: Event) -> list[dict[str, Any]]:
    """The WebSocket messages an event becomes (none for kinds that are not pushed)."""
    pushes = []
    for push_type in PUSHED_KINDS.get(event.kind, ()):
        data = dict(event.data)
        if push_type == "metric_update":
            data = {k: event.data.get(k) for k in
                    ("eval_accuracy", "eval_loss", "train_loss", "train_accuracy", "participants",
                     "round_seconds", "epsilon_spent", "version")}
        pushes.append({"type": push_type, "training_id": event.training_id, "round": event.round,
                       "agent_id": event.agent_id, "severity": event.severity.value,
                       "message": event.message, "data": data, "at": event.at})
    return pushes


@dataclass
class Subscriber:
    """One WebSocket client: its topics (training ids or ``*``) within its organisation
    (``org_id`` None: every organisation, the bootstrap key)."""

    client_id: str
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    topics: set[str] = field(default_factory=set)
    dropped: int = 0
    org_id: str | None = None
    key_id: str = ""

    def may_follow(self, topic: str) -> bool:
        """``*`` (all it may see) or a training of its organisation, told by the id's ``<org>.`` prefix."""
        return topic == ALL or self.org_id is None or org_of_training(topic) == self.org_id

    def wants(self, training_id: str | None) -> bool:
        """Whether an event about ``training_id`` goes to this client; an organisation's client gets
        only events about its trainings (none of the system-wide ones)."""
        if self.org_id is not None and (training_id is None or org_of_training(training_id) != self.org_id):
            return False
        return ALL in self.topics or (training_id is not None and training_id in self.topics)

    def offer(self, message: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            DROPPED.inc()


class EventHub:
    def __init__(self, redis: aioredis.Redis, streams: list[str]) -> None:
        """``streams``: the event streams of every cell (``protocol/keys.py``), each tailed on its own."""
        self._redis = redis
        self._streams = streams
        self.subscribers: dict[int, Subscriber] = {}

    def sockets_of(self, key_id: str) -> int:
        return sum(1 for subscriber in self.subscribers.values() if subscriber.key_id == key_id)

    def add(self, subscriber: Subscriber) -> None:
        self.subscribers[id(subscriber)] = subscriber
        SOCKETS.set(len(self.subscribers))

    def remove(self, subscriber: Subscriber) -> None:
        self.subscribers.pop(id(subscriber), None)
        SOCKETS.set(len(self.subscribers))

    def publish(self, event: Event) -> None:
        for push in to_pushes(event):
            for subscriber in list(self.subscribers.values()):
                if subscriber.wants(event.training_id):
                    subscriber.offer(push)

    async def run(self, stop: asyncio.Event) -> None:
        """Tail the event streams (from now on) until ``stop``."""
        await asyncio.gather(*(self._tail(stream, stop) for stream in self._streams))

    async def _tail(self, stream: str, stop: asyncio.Event) -> None:
        last_id: bytes | str = "$"
        while not stop.is_set():
            try:
                reply = await self._redis.xread({stream: last_id}, count=500, block=500)
            except (RedisError, OSError) as exc:  # live pushes must outlive any bus hiccup
                log.warning("event stream read failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for _stream, entries in read_batches(reply):
                for entry_id, fields in entries:
                    last_id = entry_id
                    try:
                        self.publish(decode(Event, fields))
                    except MalformedMessage:
                        continue
