"""Shared fixtures: a real valkey-server on a free loopback port for the whole session."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from federated_learning.bus.embedded import EmbeddedValkey
from tests.ports import free_port

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


S3_START_S = 60.0
"""How long the object store may take to answer when it starts (a deadline for a failed start,
not a wait: the fixture goes on as soon as it answers)."""


@contextlib.contextmanager
def s3_server(**environment: str) -> Iterator[str]:
    """An S3-compatible object store on a free loopback port, in a process of its own: moto's
    server (no MinIO binary comes from a package index this project installs from). It speaks
    the S3 REST API over HTTP, so the store's client runs as it would against AWS or MinIO."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **environment})
    try:
        deadline = time.monotonic() + S3_START_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 server on port {port} did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One S3 server for the session (:func:`s3_server`); each test takes a bucket of its own."""
    with s3_server() as url:
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket of :func:`s3_endpoint`, with credentials in the environment (the AWS chain)."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"fl-test-{secrets.token_hex(6)}"
    boto3.session.Session().client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket
