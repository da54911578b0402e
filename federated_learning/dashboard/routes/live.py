"""WebSocket ``/ws/{client_id}``: subscribe to trainings (or ``*``) and receive their events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from federated_learning.dashboard.live import EventHub, Subscriber

router = APIRouter(tags=["live"])


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


@router.websocket("/ws/{client_id}")
async def live(websocket: WebSocket, client_id: str) -> None:
    hub: EventHub = websocket.app.state.hub
    await websocket.accept()
    subscriber = Subscriber(client_id=client_id[:128])
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
