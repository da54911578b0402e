"""Models read once per process for every agent in it.

A host that runs many agents (``python -m agents run --agents N``, a fleet of bots) hands each of
them the same global model every round. Models are content-addressed and immutable: once one agent
has read a blob and checked its SHA-256 and layout, the others in the process use the same decoded,
read-only layers instead of reading, hashing and decoding the same bytes again. Agents that ask
while the first read is in flight wait for it.

Sharing gives no agent more than it could read: an agent only asks for the digest its own task
names, which its own credentials can read from the deployment's blobs (every agent may read the
services' blobs; see ``deploy/acl.py``).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from federated_learning.types import BlobDigest, NamedLayers

DEFAULT_MODELS_KEPT = 4
"""Models kept per process: the current round's of a few trainings at once."""


class SharedModels:
    """Decoded models by digest, read at most once at a time, the most recently used kept."""

    def __init__(self, models_kept: int = DEFAULT_MODELS_KEPT) -> None:
        if models_kept < 1:
            raise ValueError(f"models_kept must be at least 1; got {models_kept}")
        self.models_kept = models_kept
        self._models: OrderedDict[tuple[BlobDigest, int], asyncio.Future[NamedLayers]] = OrderedDict()
        self.reads = 0
        """How many reads went to the blob store (the rest were shared)."""

    async def get(self, digest: BlobDigest, max_bytes: int,
                  read: Callable[[], Awaitable[NamedLayers]]) -> NamedLayers:
        """The layers of ``digest``: ``read()`` (which reads, checks and decodes them) unless this
        process has them or is reading them. A failed read is not kept: the next agent tries again
        (those that waited for it get its error)."""
        key = (digest, max_bytes)
        while (shared := self._models.get(key)) is not None:
            self._models.move_to_end(key)
            try:
                return await asyncio.shield(shared)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not shared.cancelled() or (current is not None and current.cancelling()):
                    raise  # this agent is being cancelled
                # else the agent reading it was cancelled: read it here
        shared = asyncio.get_running_loop().create_future()
        self._models[key] = shared
        while len(self._models) > self.models_kept:
            self._models.popitem(last=False)
        self.reads += 1
        try:
            layers = await read()
        except BaseException as exc:
            if self._models.get(key) is shared:
                del self._models[key]
            if isinstance(exc, Exception):
                shared.set_exception(exc)
                shared.exception()  # retrieved: nobody may be waiting
            else:
                shared.cancel()
            raise
        for layer in layers.values():
            layer.flags.writeable = False  # one agent's trainer must not change another's model
        shared.set_result(layers)
        return layers
