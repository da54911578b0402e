"""WebSocket ``/ws/{client_id}``: subscribe to trainings (or ``*``) and receive their events.

The key comes as ``?api_key=KEY`` (browsers cannot set headers on a WebSocket), ``X-API-Key`` or
``Authorization: Bearer``; without a valid one the socket is closed with code 4401. An
organisation's key follows only its organisation's trainings: subscribing to another's is
answered with an error (code 403) and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from federated_learning.access import Permission, Principal
from federated_learning.dashboard.auth import presented_key, principal_for
from federated_learning.dashboard.live import EventHub, Subscriber
from federated_learning.services.runtime import ServiceContext

router = APIRouter(tags=["live"])

UNAUTHORIZED_CLOSE = 4401
"""WebSocket close code for a missing or bad key (4000-4999 are the application's; 4401 mirrors HTTP 401)."""


async def _receive_commands(websocket: WebSocket, subscriber: Subscriber) -> None:
    while True:
        text = await websocket.receive_text()
        try:
            command: Any = json.loads(text)
        except ValueError:
            command = None
        if not isinstance(command, dict) or command.get("action") not in ("subscribe", "unsubscribe"):
            await subscriber.queue.put({"type": "error",
                                        "message": "expected {\"action\": \"subscribe\"|\"unsubscribe\", "
                                                   "\"training_id\": ID or \"*\"}"})
            continue
        topic = str(command.get("training_id") or "*")
        if command["action"] == "subscribe" and not subscriber.may_follow(topic):
            await subscriber.queue.put({"type": "error", "code": 403, "training_id": topic,
                                        "message": f"training '{topic}' belongs to another organisation"})
            continue
        if command["action"] == "subscribe":
            subscriber.topics.add(topic)
        else:
            subscriber.topics.discard(topic)
        await subscriber.queue.put({"type": f"{command['action']}d", "training_id": topic})


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
    subscriber = Subscriber(client_id=client_id[:128], org_id=principal.org_id)
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
