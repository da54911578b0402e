"""WebSocket ``/ws/{client_id}``: subscribe to trainings (or ``*``) and receive their events.

The key comes as ``?api_key=KEY`` (browsers cannot set headers on a WebSocket), ``X-API-Key`` or
``Authorization: Bearer``; without a valid one the socket is closed with code 4401. An
organisation's key follows only its organisation's trainings: subscribing to another's is
answered with an error (code 403) and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from federated_learning.access import Permission, Principal
from federated_learning.dashboard.auth import presented_key, principal_for
from federated_learning.dashboard.live import EventHub, Subscriber
from federated_learning.services.runtime import ServiceContext

router = APIRouter(tags=["live"])

UNAUTHORIZED_CLOSE = 4401
"""WebSocket close code for a missing or bad key (4000-4999 are the application's; 4401 mirrors HTTP 401)."""
TOO_MANY_CLOSE = 4429
"""Close code when the key holds ``max_sockets_per_key`` (settings) sockets already."""
MAX_COMMAND_CHARS = 1024
MAX_TOPICS = 64
"""Trainings one socket may follow by id (``*`` follows all of them)."""
USAGE = 'expected a text frame {"action": "subscribe"|"unsubscribe", "training_id": ID or "*"}'
TOPIC = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9_.\-]{0,127})$")


def parse_command(message: Mapping[str, Any]) -> tuple[str, str] | str:
    """(action, topic) of a client's frame, or why it is not a command (binary, too long, not JSON,
    nested too deep, unknown action, a training id that is no id)."""
    text = message.get("text")
    if not isinstance(text, str):
        return USAGE + "; got a binary frame"
    if len(text) > MAX_COMMAND_CHARS:
        return f"{USAGE}; got {len(text)} characters (at most {MAX_COMMAND_CHARS})"
    try:
        command: Any = json.loads(text)
    except (ValueError, RecursionError):
        return USAGE
    if not isinstance(command, dict) or command.get("action") not in ("subscribe", "unsubscribe"):
        return USAGE
    topic = command.get("training_id") or "*"
    if not isinstance(topic, str) or not TOPIC.match(topic):
        return f"{USAGE}; training_id must be a training id or \"*\""
    return str(command["action"]), topic


async def _receive_commands(websocket: WebSocket, subscriber: Subscriber) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(int(message.get("code") or 1000))
        parsed = parse_command(message)
        if isinstance(parsed, str):
            await subscriber.queue.put({"type": "error", "message": parsed})
            continue
        action, topic = parsed
        if action == "subscribe" and topic not in subscriber.topics and len(subscriber.topics) >= MAX_TOPICS:
            await subscriber.queue.put({"type": "error", "code": 429, "training_id": topic,
                                        "message": f"this socket follows {MAX_TOPICS} trainings already; "
                                                   "unsubscribe one or subscribe to \"*\""})
            continue
        if action == "subscribe" and not subscriber.may_follow(topic):
            await subscriber.queue.put({"type": "error", "code": 403, "training_id": topic,
                                        "message": f"training '{topic}' belongs to another organisation"})
            continue
        if action == "subscribe":
            subscriber.topics.add(topic)
        else:
            subscriber.topics.discard(topic)
        await subscriber.queue.put({"type": f"{action}d", "training_id": topic})


async def _send_events(websocket: WebSocket, subscriber: Subscriber) -> None:
    while True:
        message = await subscriber.queue.get()
        if subscriber.dropped:
            await websocket.send_json({"type": "dropped", "count": subscriber.dropped,
                                       "message": "events were dropped because this client reads too slowly"})
            subscriber.dropped = 0
        await websocket.send_json(message)


async def _principal(websocket: WebSocket) -> Principal | None:
    ctx: ServiceContext = websocket.app.state.ctx
    key = websocket.query_params.get("api_key") or presented_key(
        websocket.headers.get("x-api-key"), websocket.headers.get("authorization"))
    principal = await principal_for(ctx, key)
    if principal is None or not principal.allows(Permission.READ):
        await ctx.reject("ws", "unauthorized", "missing, wrong, revoked or expired API key")
        return None
    return principal


@router.websocket("/ws/{client_id}")
async def live(websocket: WebSocket, client_id: str) -> None:
    hub: EventHub = websocket.app.state.hub
    principal = await _principal(websocket)
    await websocket.accept()
    if principal is None:
        await websocket.close(code=UNAUTHORIZED_CLOSE, reason="missing, wrong, revoked or expired API key")
        return
    cap = websocket.app.state.ctx.settings.max_sockets_per_key
    if hub.sockets_of(principal.key_id) >= cap:
        await websocket.app.state.ctx.reject("ws", "too_many_sockets", f"key {principal.key_id} holds {cap} sockets")
        await websocket.close(code=TOO_MANY_CLOSE, reason=f"this key holds {cap} live sockets already")
        return
    subscriber = Subscriber(client_id=client_id[:128], org_id=principal.org_id, key_id=principal.key_id)
    hub.add(subscriber)
    tasks = [asyncio.create_task(_receive_commands(websocket, subscriber)),
             asyncio.create_task(_send_events(websocket, subscriber))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect):
                raise exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        hub.remove(subscriber)
