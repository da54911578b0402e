"""Shared fixtures: a real valkey-server on a free loopback port for the whole session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from federated_learning.bus.embedded import EmbeddedValkey

# Kernels compile once per test session into a shared cache, not in every test.
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parent.parent / "data" / "numba-cache"))


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(valkey_server: EmbeddedValkey) -> str:
    return valkey_server.url


@pytest.fixture
async def redis(valkey_server: EmbeddedValkey) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(valkey_server.url)
    await client.flushall()
    yield client
    await client.aclose()
