"""Connections to Redis/Valkey: ACL credentials, TLS, retry with backoff, bounded start-up attempts.

A server with cluster mode on gets a cluster client (:func:`is_cluster`): any node's URL will do,
the client learns the others and follows slots as they move or fail over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import quote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from federated_learning.bus.cluster_client import ServicesCluster
from federated_learning.config import Settings
from federated_learning.protocol.keys import Keys

log = logging.getLogger(__name__)

OPERATION_RETRIES = 8
"""How often one command is retried on a lost connection before the error surfaces."""
TLS_ENVIRONMENT = {"ca_file": "FL_REDIS_TLS_CA_FILE", "cert_file": "FL_REDIS_TLS_CERT_FILE",
                   "key_file": "FL_REDIS_TLS_KEY_FILE"}


class RedisRefused(RedisConnectionError):
    """The server was reached but refused us: wrong credentials, or a failed TLS handshake.

    Retrying cannot help, so :func:`connect` raises it at once.
    """


@dataclass(frozen=True)
class RedisTls:
    """Files for ``rediss://``: the CA that signed the server's certificate, and the
    client certificate and key when the server asks for one."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisTls:
        return cls(settings.redis_tls_ca_file, settings.redis_tls_cert_file,
                   settings.redis_tls_key_file)

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None) -> RedisTls:
        """``FL_REDIS_TLS_CA_FILE``, ``FL_REDIS_TLS_CERT_FILE``, ``FL_REDIS_TLS_KEY_FILE`` (agents)."""
        env = dict(os.environ if env is None else env)
        paths = {field: Path(env[name]) if env.get(name) else None
                 for field, name in TLS_ENVIRONMENT.items()}
        return cls(**paths)

    def redis_kwargs(self) -> dict[str, object]:
        """The redis-py ``ssl_*`` arguments for these files."""
        kwargs: dict[str, object] = {}
        if self.ca_file is not None:
            kwargs["ssl_ca_certs"] = str(self.ca_file)
        if self.cert_file is not None:
            kwargs["ssl_certfile"] = str(self.cert_file)
        if self.key_file is not None:
            kwargs["ssl_keyfile"] = str(self.key_file)
        return kwargs

    def describe(self) -> str:
        return (f"CA {self.ca_file or 'the system store'}, client certificate "
                f"{self.cert_file or 'none'}")


def with_credentials(url: str, username: str, password: str) -> str:
    """``url`` logging in as ``username`` (an ACL user) instead of whoever it named."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    user = parts.netloc.rsplit("@", 1)[0].split(":", 1)[0]
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if user else f"***@{host}"))


SOCKET_READ_BYTES = 1 << 20
"""The most one socket read takes in. With redis-py's 64 KiB a lone 4 MB GET (a model a service
fetches) cost 9.7 ms of CPU through our client, with 1 MiB 4.8 ms; a read takes what is there,
so small replies cost the same. (69 agents fetching at once on one loop read smaller pieces:
their round did not change measurably.)"""


def _connection_kwargs(url: str, tls: RedisTls | None) -> dict[str, object]:
    """What every client of ours sets: health checks, keepalive, a pool large enough for the
    blocking reads of many consumers, large socket reads, and for ``rediss://`` a certificate
    that is checked."""
    kwargs: dict[str, object] = {"health_check_interval": 15, "socket_keepalive": True, "max_connections": 10_000,
                                 "socket_read_size": SOCKET_READ_BYTES}
    if url.startswith("rediss://"):
        # Explicit, whatever the redis-py version's defaults: the server's certificate must be
        # valid and name the host we dialled.
        kwargs.update({"ssl_cert_reqs": "required", "ssl_check_hostname": True})
        if tls is not None:
            kwargs.update(tls.redis_kwargs())
    return kwargs


def _client(url: str, tls: RedisTls | None, retries: int) -> aioredis.Redis:
    kwargs = {**_connection_kwargs(url, tls),
              "retry": Retry(ExponentialBackoff(cap=5.0, base=0.05) if retries else NoBackoff(), retries),
              "retry_on_error": [RedisConnectionError, RedisTimeoutError]}
    return aioredis.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]


def _cluster_client(url: str, tls: RedisTls | None) -> aioredis.Redis:
    """A cluster client seeded with ``url``'s node. A command whose node went away waits for the
    cluster to promote a replica: the client re-reads the slot map between its retries."""
    kwargs = {**_connection_kwargs(url, tls),
              "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), 2 * OPERATION_RETRIES)}
    # The cluster client offers the same commands, pipelines and transactions (one slot each)
    # under another class; the services are written against ``aioredis.Redis``.
    return cast(aioredis.Redis, ServicesCluster.from_url(url, **kwargs))


def is_cluster(redis: aioredis.Redis) -> bool:
    """Whether ``redis`` talks to a Redis/Valkey Cluster (its keys use ``Keys(cluster=True)``)."""
    return isinstance(redis, RedisCluster)


def keys_for(redis: aioredis.Redis, prefix: str, partitions: int = 1) -> Keys:
    """The key names of deployment ``prefix`` (split into ``partitions`` coordinator partitions)
    on the server behind ``redis``."""
    return Keys(prefix, cluster=is_cluster(redis), partitions=partitions)


def _tls_of(settings: Settings | None, tls: RedisTls | None) -> RedisTls | None:
    if tls is not None:
        return tls
    return RedisTls.from_settings(settings) if settings is not None else None


def client_from_url(url: str, settings: Settings | None = None, *,
                    tls: RedisTls | None = None) -> aioredis.Redis:
    """An asyncio client for ``url`` (``redis://``; ``rediss://`` with ``tls``, else the
    files configured in ``settings``); the URL's user and password log in (ACL users)."""
    return _client(url, _tls_of(settings, tls), OPERATION_RETRIES)


def _in_chain(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kinds):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _closed_by_server(exc: BaseException) -> bool:
    """The server accepted the connection, then dropped it (what a TLS server that refused our
    client certificate looks like under TLS 1.3: the handshake completes first)."""
    return (_in_chain(exc, (ConnectionResetError, BrokenPipeError)) is not None
            or "closed by server" in str(exc).lower())


def _refusal(exc: Exception, where: str, url: str, tls: RedisTls | None) -> RedisRefused | None:
    """A clear error for what retrying cannot fix: bad credentials or a failed TLS handshake."""
    if isinstance(exc, AuthenticationError):
        user = urlsplit(url).username or "default"
        return RedisRefused(f"redis at {where} refused user '{user}': {exc} "
                            "(check the password, or provision the ACL users)")
    failure = _in_chain(exc, (ssl.SSLError,))
    if failure is not None:
        return RedisRefused(f"TLS with redis at {where} failed: {failure} "
                            f"(using {(tls or RedisTls()).describe()})")
    return None


def _final_refusal(exc: Exception, where: str, url: str, tls: RedisTls | None) -> RedisRefused | None:
    """After the last attempt: a TLS server that kept dropping us most likely refused our
    client certificate (or wants one)."""
    if url.startswith("rediss://") and _closed_by_server(exc):
        return RedisRefused(f"TLS with redis at {where} failed: the server closed every connection "
                            f"after the handshake ({exc}); it most likely requires a client "
                            f"certificate it trusts (using {(tls or RedisTls()).describe()})")
    return None


async def _probe(url: str, tls: RedisTls | None) -> bool:
    """One PING on a client that does not retry, so that a refusal shows at once; whether the
    server runs in cluster mode."""
    probe = _client(url, tls, 0)
    try:
        await probe.ping()
        try:
            await probe.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        except NoPermissionError:
            log.warning("this Redis user may not run CLUSTER INFO (provisioned by an older version?): "
                        "taking the server for a standalone one; provision the users again if it is a cluster")
            return False
        except ResponseError:  # "cluster support disabled", or a server without the command
            return False
        return True
    finally:
        await probe.aclose()


async def connect(url: str, settings: Settings | None = None, *, attempts: int = 20,
                  tls: RedisTls | None = None) -> aioredis.Redis:
    """Connect and PING, retrying ``attempts`` times with backoff; re-raise the last error.

    Raises :class:`RedisRefused` without retrying when the server rejects the credentials
    or the TLS handshake fails (wrong CA, missing or unknown client certificate).
    """
    tls = _tls_of(settings, tls)
    parts = urlsplit(url)
    where = f"{parts.hostname or '?'}:{parts.port or '?'}"
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            if await _probe(url, tls):
                cluster = _cluster_client(url, tls)
                try:
                    # Learn every node now: it can then find the slots' new primaries even if the
                    # node in ``url`` is the one that fails.
                    await cast(RedisCluster, cluster).initialize()
                except BaseException:
                    await cluster.aclose()
                    raise
                return cluster
            return client_from_url(url, tls=tls)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            refused = _refusal(exc, where, url, tls)
            if refused is not None:
                raise refused from exc
            left = attempts - attempt
            log.warning("redis at %s not reachable (%s); %d attempts left", where, exc, left)
            if left == 0:
                final = _final_refusal(exc, where, url, tls)
                if final is not None:
                    raise final from exc
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")
