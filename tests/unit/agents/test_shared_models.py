"""Agents in one process read each model once: the others share the decoded, read-only layers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agents.shared_models import SharedModels
from federated_learning.types import BlobDigest, NamedLayers

A, B, C = (BlobDigest(c * 64) for c in "abc")


def reader(reads: list[BlobDigest], digest: BlobDigest, gate: asyncio.Event | None = None):
    async def read() -> NamedLayers:
        reads.append(digest)
        if gate is not None:
            await gate.wait()
        return {"w": np.full(3, len(reads), dtype=np.float32)}
    return read


async def test_agents_asking_at_once_share_one_read_and_cannot_change_the_model() -> None:
    models, reads, gate = SharedModels(), [], asyncio.Event()
    waiting = [asyncio.create_task(models.get(A, 100, reader(reads, A, gate))) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    layers = await asyncio.gather(*waiting)
    assert reads == [A] and models.reads == 1
    assert all(got is layers[0] for got in layers)
    with pytest.raises(ValueError, match="read-only"):
        layers[0]["w"][0] = 1.0
    assert await models.get(A, 100, reader(reads, A)) is layers[0], "a later agent reads nothing"
    await models.get(A, 50, reader(reads, A))
    assert reads == [A, A], "another size limit is another check"


async def test_the_least_recently_used_model_goes_first() -> None:
    models, reads = SharedModels(models_kept=2), []
    for digest in (A, B, A, C, A, B):
        await models.get(digest, 100, reader(reads, digest))
    assert reads == [A, B, C, B]


async def test_a_failed_read_reaches_those_waiting_and_is_not_kept() -> None:
    models, gate = SharedModels(), asyncio.Event()

    async def failing() -> NamedLayers:
        await gate.wait()
        raise LookupError("gone")

    first = asyncio.create_task(models.get(A, 100, failing))
    await asyncio.sleep(0)
    second = asyncio.create_task(models.get(A, 100, failing))
    await asyncio.sleep(0)
    gate.set()
    for task in (first, second):
        with pytest.raises(LookupError, match="gone"):
            await task
    reads: list[BlobDigest] = []
    assert (await models.get(A, 100, reader(reads, A)))["w"][0] == 1.0 and reads == [A]
    with pytest.raises(ValueError):
        SharedModels(models_kept=0)


async def test_an_agent_waiting_on_a_read_whose_reader_was_cancelled_reads_itself() -> None:
    models, reads, gate = SharedModels(), [], asyncio.Event()
    first = asyncio.create_task(models.get(A, 100, reader(reads, A, gate)))
    await asyncio.sleep(0)
    second = asyncio.create_task(models.get(A, 100, reader(reads, A)))
    await asyncio.sleep(0)
    first.cancel()
    layers = await second
    assert first.cancelled() and reads == [A, A] and layers["w"][0] == 2.0
