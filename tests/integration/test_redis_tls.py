"""``rediss://`` through a TLS-terminating proxy in front of the test valkey-server.

The embedded valkey-server is built without TLS, so the test puts an asyncio TLS server
(requiring client certificates) on a free loopback port, forwarding to the plain port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from federated_learning.bus.connection import RedisRefused, RedisTls, connect
from federated_learning.bus.embedded import EmbeddedValkey
from federated_learning.config import Settings
from tests.integration.certificates import Pki, make_pki


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


class TlsProxy:
    """TLS (client certificate required) on a free port, forwarding to ``target_port``."""

    def __init__(self, pki: Pki, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        self.context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, self.host, 0, ssl=self.context)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        link = asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        self.links.add(link)  # type: ignore[arg-type]
        with contextlib.suppress(asyncio.CancelledError):
            await link

    async def stop(self) -> None:
        for link in self.links:
            link.cancel()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def tls_url(pki: Pki, valkey_server: EmbeddedValkey) -> AsyncIterator[str]:
    proxy = TlsProxy(pki, valkey_server.port)
    port = await proxy.start()
    yield f"rediss://127.0.0.1:{port}/0"
    await proxy.stop()


async def test_configured_ca_and_client_certificate_reach_the_server_over_tls(
        tls_url: str, pki: Pki, redis: aioredis.Redis) -> None:
    settings = Settings(redis_url=tls_url, redis_tls_ca_file=pki.ca,
                        redis_tls_cert_file=pki.client_cert, redis_tls_key_file=pki.client_key)
    client = await connect(tls_url, settings, attempts=1)
    try:
        assert client.connection_pool.connection_class is SSLConnection
        assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == str(pki.ca)
        assert client.connection_pool.connection_kwargs["ssl_check_hostname"] is True
        await client.set("tls:probe", b"through the proxy")
        assert await redis.get("tls:probe") == b"through the proxy"
    finally:
        await client.aclose()


async def test_blob_fetches_on_worker_threads_use_the_same_tls_files(
        tls_url: str, pki: Pki, redis: aioredis.Redis) -> None:
    from federated_learning.bus.blobs import blocking_client_like

    settings = Settings(redis_url=tls_url, redis_tls_ca_file=pki.ca,
                        redis_tls_cert_file=pki.client_cert, redis_tls_key_file=pki.client_key)
    client = await connect(tls_url, settings, attempts=1)
    blocking = blocking_client_like(client)
    try:
        assert blocking.connection_pool.connection_kwargs["ssl_certfile"] == str(pki.client_cert)
        await redis.set("tls:blob", b"fetched on a thread")
        assert await asyncio.to_thread(blocking.get, "tls:blob") == b"fetched on a thread"
    finally:
        blocking.close()
        blocking.connection_pool.disconnect()
        await client.aclose()


async def test_a_client_that_does_not_trust_the_servers_ca_is_refused_clearly(
        tls_url: str, pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", ca_name="other-ca")
    tls = RedisTls(other.ca, pki.client_cert, pki.client_key)
    with pytest.raises(RedisRefused, match="TLS with redis at 127.0.0.1:.*certificate verify failed"):
        await connect(tls_url, attempts=5, tls=tls)


async def test_a_client_without_a_certificate_is_refused_clearly(tls_url: str, pki: Pki) -> None:
    with pytest.raises(RedisRefused, match="TLS with redis at .*client certificate.*none"):
        await connect(tls_url, attempts=2, tls=RedisTls(ca_file=pki.ca))


async def test_a_certificate_from_another_ca_is_refused(tls_url: str, pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", ca_name="other-ca")
    with pytest.raises(RedisRefused, match="TLS with redis at .*client certificate"):
        await connect(tls_url, attempts=2, tls=RedisTls(pki.ca, other.client_cert, other.client_key))


async def test_a_plain_connection_to_a_tls_port_is_not_taken_for_a_server(tls_url: str) -> None:
    plain = tls_url.replace("rediss://", "redis://")
    with pytest.raises(RedisConnectionError) as caught:
        await connect(plain, attempts=1)
    assert not isinstance(caught.value, RedisRefused)


async def test_a_server_whose_certificate_names_another_host_is_refused(
        pki: Pki, valkey_server: EmbeddedValkey) -> None:
    """The certificate names localhost and 127.0.0.1; the same server at 127.0.0.2 is refused."""
    proxy = TlsProxy(pki, valkey_server.port, host="127.0.0.2")
    port = await proxy.start()
    try:
        with pytest.raises(RedisRefused, match="TLS with redis at 127.0.0.2:.*(mismatch|doesn't match|not valid)"):
            await connect(f"rediss://127.0.0.2:{port}/0", attempts=2,
                          tls=RedisTls(pki.ca, pki.client_cert, pki.client_key))
    finally:
        await proxy.stop()
