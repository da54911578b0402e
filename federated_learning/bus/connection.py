"""Connections to Redis/Valkey: TLS, retry with backoff, bounded start-up attempts."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from federated_learning.config import Settings

log = logging.getLogger(__name__)

OPERATION_RETRIES = 8
"""How often one command is retried on a lost connection before the error surfaces."""


def client_from_url(url: str, settings: Settings | None = None) -> aioredis.Redis:
    """An asyncio client for ``url`` (``redis://``, ``rediss://`` with the configured CA/cert)."""
    kwargs: dict[str, object] = {
        "retry": Retry(ExponentialBackoff(cap=5.0, base=0.05), OPERATION_RETRIES),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "health_check_interval": 15,
        "socket_keepalive": True,
        "max_connections": 10_000,
    }
    if url.startswith("rediss://") and settings is not None:
        if settings.redis_tls_ca_file:
            kwargs["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
        if settings.redis_tls_cert_file:
            kwargs["ssl_certfile"] = str(settings.redis_tls_cert_file)
        if settings.redis_tls_key_file:
            kwargs["ssl_keyfile"] = str(settings.redis_tls_key_file)
    return aioredis.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]


async def connect(url: str, settings: Settings | None = None, *, attempts: int = 20) -> aioredis.Redis:
    """Connect and PING, retrying ``attempts`` times with backoff; re-raise the last error."""
    client = client_from_url(url, settings)
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            await client.ping()
            return client
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            left = attempts - attempt
            host = client.connection_pool.connection_kwargs.get("host", "?")
            port = client.connection_pool.connection_kwargs.get("port", "?")
            log.warning(
                "redis at %s:%s not reachable (%s); %d attempts left", host, port, exc, left
            )
            if left == 0:
                await client.aclose()
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")
