"""Dashboard process: the FastAPI app under uvicorn, plus its health key; metrics at /metrics."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from federated_learning.bus.connection import connect
from federated_learning.config import Settings, load_settings
from federated_learning.dashboard.main import create_app
from federated_learning.services.runtime import SHUTDOWN_GRACE_S, ServiceContext, setup_logging

log = logging.getLogger(__name__)


def server_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """Uvicorn's settings: the configured address, HTTPS when a certificate is configured."""
    cert, key = settings.dashboard_tls_cert_file, settings.dashboard_tls_key_file
    return uvicorn.Config(app, host=settings.dashboard_host, port=settings.dashboard_port,
                          log_level="warning", ws="websockets-sansio", lifespan="on",
                          timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
                          ssl_certfile=str(cert) if cert else None,
                          ssl_keyfile=str(key) if key else None)


def _after_graceful_shutdown(signum: int, _frame: FrameType | None) -> None:
    """uvicorn raises the stop signal it handled again once it has shut down; this handler,
    which it restores first, lets the process close its connection and exit 0 instead of
    dying of that signal."""
    log.info("dashboard shut down on %s", signal.Signals(signum).name)


async def _main(args: argparse.Namespace) -> None:
    settings = load_settings(args.config)
    setup_logging(settings.log_level, "dashboard")
    url = os.environ.get("FL_REDIS_URL") or settings.redis_url
    redis = await connect(url, settings, attempts=settings.redis_connect_attempts)
    ctx = ServiceContext(redis=redis, settings=settings, service="dashboard", instance=args.instance,
                         metrics_port=settings.dashboard_port)
    server = uvicorn.Server(server_config(create_app(ctx), settings))
    log.info("dashboard on %s://%s:%d", settings.dashboard_scheme, settings.dashboard_host,
             settings.dashboard_port)
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _after_graceful_shutdown)
    try:
        await server.serve()
    finally:
        await redis.aclose()
        log.info("dashboard/%s stopped", args.instance)


def main() -> None:
    parser = argparse.ArgumentParser(description="federated learning dashboard")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--instance", default="0")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
