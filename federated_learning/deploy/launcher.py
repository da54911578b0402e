"""``scripts/deploy-federated-learning.py``: start Redis (embedded) and every service, supervise, stop.

Writes ``<data_dir>/run/deployment.json`` (the Redis URL, the dashboard URL, the
log folder) so that agents and scripts on this machine find the deployment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from types import FrameType

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from federated_learning.bus.blob_stores import (
    BlobStoreUnreachable,
    check_services_blob_store,
    object_store_settings,
)
from federated_learning.bus.connection import RedisTls, redacted
from federated_learning.bus.embedded import EmbeddedServerError, EmbeddedValkey
from federated_learning.config import (
    SECRETS_DIR_ENV,
    ConfigError,
    Settings,
    load_settings,
    without_secrets,
)
from federated_learning.deploy.access import (
    ADMIN_URL_ENV,
    RoleSecrets,
    RoleUrls,
    admin_url_for,
    provision_at_start,
    provision_command,
    role_urls,
    write_role_secrets,
)
from federated_learning.deploy.acl import AclError, secrets_dir
from federated_learning.deploy.supervisor import Child, Supervisor
from federated_learning.secret_files import keep_or_create_secret, private_folder, write_secret

log = logging.getLogger("deploy")

POLL_S = 0.2
BUS_CHECK_S = 5.0
"""How long the launcher waits for an external Redis to answer PING before it gives up."""
BUS_CHECK_DELAY_CAP_S = 1.0
START_ORDER = ("versions", "privacy", "aggregator", "coordinator", "monitor", "dashboard")
VALKEY = "valkey"
STOP_ORDER = (("dashboard",), ("coordinator", "aggregator", "privacy", "versions", "monitor"), (VALKEY,))
"""Stopped tier by tier, a tier's processes together: the dashboard first (no new commands),
then the services (each finishes the entry in hand; what is left waits in its stream), the
embedded server last, so that the services' last writes reach it."""
SERVICES_TIER = 1


class BusUnreachable(RuntimeError):
    """The configured Redis did not answer PING in time, or refused the URL's credentials."""


def deployment_file(data_dir: Path) -> Path:
    return data_dir / "run" / "deployment.json"


def role_secrets_folder(data_dir: Path) -> Path:
    """Where the running deployment keeps each role's secret settings (removed at stop)."""
    return data_dir / "run" / "secrets"


def read_deployment(data_dir: Path) -> dict[str, str]:
    """What a running deployment wrote about itself (Redis URL, dashboard URL)."""
    path = deployment_file(data_dir)
    if not path.exists():
        raise FileNotFoundError(f"no deployment found: {path} does not exist")
    data: dict[str, str] = json.loads(path.read_text())
    return data


def deployment_secret(data_dir: Path, name: str) -> str:
    """A secret generated for this deployment: made once, kept (mode 0600) across restarts."""
    folder = private_folder(data_dir / "secrets")
    return keep_or_create_secret(folder / name, lambda: secrets.token_urlsafe(24))


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def instances_of(settings: Settings, service: str) -> int:
    """How many processes of ``service`` the launcher starts."""
    return {"aggregator": settings.aggregator_workers,
            "coordinator": settings.coordinator_processes}.get(service, 1)


def scrape_targets(settings: Settings) -> dict[str, list[str]]:
    """Prometheus targets of this deployment by service (empty when metrics ports are random)."""
    if not settings.metrics_port_base:
        return {}
    host = "127.0.0.1"
    targets = {service: [f"{host}:{settings.metrics_port(service, i)}" for i in range(instances_of(settings, service))]
               for service in ("coordinator", "aggregator", "privacy", "versions", "monitor")}
    targets["dashboard"] = [f"{settings.dashboard_host}:{settings.dashboard_port}"]
    return targets


def _tls_scrape_lines(settings: Settings) -> list[str]:
    """Scrape the dashboard's /metrics over HTTPS when it serves HTTPS."""
    if settings.dashboard_tls_cert_file is None:
        return []
    lines = ["    scheme: https"]
    if settings.dashboard_tls_ca_file is not None:
        lines += ["    tls_config:", f"      ca_file: {settings.dashboard_tls_ca_file.resolve()}"]
    return lines


PROMETHEUS_CONFIG_HEADER = (
    "# Prometheus scrape configuration written by federated_learning.deploy.launcher.prometheus_config",
    "# for metrics_port_base {base}, aggregator_workers {workers} and coordinator_processes {coordinators}",
    "# (one target per process).",
    "# The launcher writes the one for its own settings to <data_dir>/run/prometheus.yml.",
    "# With metrics_port_base 0 the ports are random: read them from GET /api/system/health",
    "# (services.*.metrics_port) or use file_sd.",
)


def prometheus_config(settings: Settings) -> str:
    """A Prometheus scrape configuration for this deployment's ports.

    ``deploy/prometheus.yml`` is this function's output for the shipped ``config.json``.
    """
    header = [line.format(base=settings.metrics_port_base, workers=settings.aggregator_workers,
                          coordinators=settings.coordinator_processes)
              for line in PROMETHEUS_CONFIG_HEADER]
    lines = [*header, "global:", "  scrape_interval: 15s", "scrape_configs:"]
    targets = scrape_targets(settings)
    dashboard = {"dashboard": targets.pop("dashboard")} if targets else {}
    jobs: list[tuple[str, dict[str, list[str]], list[str]]] = [("federated-learning", targets, [])]
    if _tls_scrape_lines(settings):
        jobs.append(("federated-learning-dashboard", dashboard, _tls_scrape_lines(settings)))
    else:
        targets.update(dashboard)
    for job, job_targets, extra in jobs:
        lines += [f"  - job_name: {job}", *extra, "    static_configs:"]
        for service, addresses in job_targets.items():
            quoted = ", ".join(f'"{address}"' for address in addresses)
            lines.append(f"      - targets: [{quoted}]")
            lines.append(f"        labels: {{service: {service}}}")
    return "\n".join(lines) + "\n"


def check_ports(settings: Settings) -> None:
    """Refuse to start when a configured port is taken; name the key."""
    if settings.dashboard_port and _port_in_use(settings.dashboard_host, settings.dashboard_port):
        raise ConfigError(f"config 'dashboard_port' is {settings.dashboard_port}: port already in use")
    if settings.metrics_port_base:
        ports = [settings.metrics_port(service, i) for service in START_ORDER if service != "dashboard"
                 for i in range(instances_of(settings, service))]
        for port in ports:
            if _port_in_use("127.0.0.1", port):
                raise ConfigError(f"config 'metrics_port_base' is {settings.metrics_port_base}: "
                                  f"port {port} already in use")
    if settings.redis_embedded_port and settings.uses_embedded_redis and \
            _port_in_use("127.0.0.1", settings.redis_embedded_port):
        raise ConfigError(f"config 'redis_embedded_port' is {settings.redis_embedded_port}: port already in use")


def failure_cause(exc: BaseException) -> str:
    """The root of a connection failure in words: the operating system's ("Connection refused",
    "Name or service not known") when an OS error is in the chain, else the exception's text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return f"TLS failed: {seen}"
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno) if seen.errno > 0 else str(seen.strerror or seen)
        seen = seen.__cause__ or seen.__context__
    return str(exc)


def _ping(url: str, settings: Settings, timeout_s: float) -> None:
    """One PING without retries; a socket that does not answer gives up after ``timeout_s``."""
    kwargs: dict[str, object] = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s,
                                 "retry": Retry(NoBackoff(), 0)}
    if url.startswith("rediss://"):
        kwargs.update({"ssl_cert_reqs": "required", "ssl_check_hostname": True,
                       **RedisTls.from_settings(settings).redis_kwargs()})
    client = redis.Redis.from_url(url, **kwargs)
    try:
        client.ping()
    finally:
        client.close()


def check_bus(settings: Settings, within_s: float = BUS_CHECK_S) -> None:
    """PING the external Redis, retrying with backoff for up to ``within_s`` seconds.

    Raises :class:`BusUnreachable` naming the URL (password redacted) and the cause. In ACL
    mode a refused login still shows the server answers: the services log in as their own users.
    """
    url = settings.redis_url
    deadline = time.monotonic() + within_s
    delay = 0.1
    while True:
        try:
            _ping(url, settings, timeout_s=min(max(deadline - time.monotonic(), 0.1), 2.0))
            return
        except (AuthenticationError, ResponseError) as exc:
            if settings.redis_acl:
                return
            raise BusUnreachable(f"the bus at {redacted(url)} refused the credentials: {exc}") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if time.monotonic() + delay >= deadline:
                raise BusUnreachable(f"cannot reach the bus at {redacted(url)}: {failure_cause(exc)} "
                                     f"(no answer to PING within {within_s:.0f}s)") from exc
        time.sleep(delay)
        delay = min(delay * 2, BUS_CHECK_DELAY_CAP_S)


def build_children(settings: Settings, config_path: Path | None, role_secrets: RoleSecrets,
                   logs: Path) -> list[Child]:
    """One child per service instance; each reads its role's secrets (Redis URL; the dashboard's
    API key) from the files of its ``$FL_SECRETS_DIR``, none from its environment."""
    env = {**without_secrets(os.environ), "PYTHONUNBUFFERED": "1",
           "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR",
                                             str((settings.data_dir / "numba-cache").resolve()))}
    if config_path is not None:
        env["FL_CONFIG_FILE"] = str(config_path.resolve())
    children = []
    for service in START_ORDER:
        instances = instances_of(settings, service)
        for instance in range(instances):
            name = f"{service}-{instance}" if instances > 1 else service
            command = [sys.executable, "-m", f"federated_learning.services.{service}",
                       "--instance", str(instance)]
            children.append(Child(name=name, command=command, log_path=logs / f"{name}.log",
                                  env={**env, SECRETS_DIR_ENV: str(role_secrets.for_service(service))}))
    return children


def valkey_child(server: EmbeddedValkey, settings: Settings, logs: Path) -> Child:
    """The embedded server as a supervised child: same port, same data folder, restarted from
    its append-only file with the services' backoff. Each start waits until it answers PING;
    a restart in ACL mode then creates the users again (the server keeps no ACL file)."""
    def ready(child: Child) -> None:
        assert child.process is not None
        url = server.wait_ready(child.process)
        if child.restarts and settings.redis_acl:
            provision_at_start(settings, url, settings.data_dir.resolve(), save=False)

    return Child(name=VALKEY, command=server.command(), log_path=logs / "valkey.log",
                 env=without_secrets(os.environ), ready=ready)


def stop_tier(name: str) -> int:
    """The index in ``STOP_ORDER`` of the child ``name`` (``aggregator-1`` is an aggregator);
    a name not listed there stops with the services."""
    service = name.split("-")[0]
    return next((i for i, tier in enumerate(STOP_ORDER) if service in tier), SERVICES_TIER)


def stop_tiers(children: list[Child]) -> list[list[Child]]:
    """``children`` grouped by their tier in ``STOP_ORDER``, in that order."""
    return [[child for child in children if stop_tier(child.name) == i] for i in range(len(STOP_ORDER))]


def _role_urls(settings: Settings, redis_url: str, data_dir: Path, *, embedded: bool) -> RoleUrls:
    """In ACL mode, first create the users: always on the embedded server (its default user
    is the administrator), on an external one when ``$FL_REDIS_ADMIN_URL`` is set."""
    if settings.redis_acl:
        admin_url = redis_url if embedded else os.environ.get(ADMIN_URL_ENV, "")
        if admin_url:
            provision_at_start(settings, admin_url, data_dir, save=not embedded)
        log.info("Redis ACL mode: services and dashboard log in as their own users")
    return role_urls(settings, redis_url, data_dir)


def run(settings: Settings, config_path: Path | None) -> int:
    check_ports(settings)
    data_dir = settings.data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server: EmbeddedValkey | None = None
    valkey: list[Child] = []
    if settings.uses_embedded_redis:
        server = EmbeddedValkey(data_dir / "redis", port=settings.redis_embedded_port,
                                password=deployment_secret(data_dir, "redis_password"))
        valkey.append(valkey_child(server, settings, logs))
        valkey[0].start()
        redis_url = server.url
        log.info("embedded valkey-server at %s (password-protected; append-only file in %s)",
                 redis_url.split("@")[-1], data_dir / "redis")
    else:
        redis_url = settings.redis_url
        check_bus(settings)
        log.info("using external Redis at %s", redis_url.split("@")[-1])
    try:
        check_services_blob_store(settings.redis_key_prefix, max_bytes=settings.max_blob_bytes,
                                  blob_dir=settings.blob_dir, object_store=object_store_settings(settings))
        urls = _role_urls(settings, redis_url, data_dir, embedded=server is not None)
    except BaseException:
        Supervisor(valkey).stop_all()
        raise
    api_key = settings.api_key or deployment_secret(data_dir, "api_key")
    run_dir = private_folder(deployment_file(data_dir).parent)
    children = build_children(settings, config_path,
                              write_role_secrets(role_secrets_folder(data_dir), urls, api_key), logs)
    supervisor = Supervisor([*valkey, *children])
    stop = {"requested": False}

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    dashboard_url = f"{settings.dashboard_scheme}://{settings.dashboard_host}:{settings.dashboard_port}"
    run_file = deployment_file(data_dir)
    write_secret(run_file, json.dumps({
        "redis_url": urls.services, "dashboard_url": dashboard_url, "api_key": api_key,
        "logs": str(logs), "key_prefix": settings.redis_key_prefix, "pid": os.getpid(),
        "started_at": time.time(), "metrics_port_base": settings.metrics_port_base,
        "redis_acl": settings.redis_acl, "redis_acl_secrets": str(secrets_dir(data_dir)),
        "dashboard_ca_file": str(settings.dashboard_tls_ca_file or ""),
    }, indent=1))
    if settings.metrics_port_base:
        (run_dir / "prometheus.yml").write_text(prometheus_config(settings))
    try:
        supervisor.start_all()
        log.info("dashboard: %s  (REST /api, WebSocket /ws/{client_id}, metrics %s/metrics)",
                 dashboard_url, dashboard_url)
        if settings.metrics_port_base:
            log.info("service metrics on 127.0.0.1:%s; logs in %s", ", ".join(
                address.rsplit(":", 1)[1] for service, addresses in scrape_targets(settings).items()
                if service != "dashboard" for address in addresses), logs)
        while not stop["requested"]:
            supervisor.poll()
            time.sleep(POLL_S)
    finally:
        stopping_since = time.monotonic()
        supervisor.stop_all(stop_tiers(supervisor.children))
        run_file.unlink(missing_ok=True)
        shutil.rmtree(role_secrets_folder(data_dir), ignore_errors=True)
        log.info("deployment stopped in %.1fs", time.monotonic() - stopping_since)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Deploy the federated learning system on this machine.")
    parser.add_argument("--config", type=Path, default=None, help="config file (default ./config.json)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="aggregator worker processes; overrides config 'aggregator_workers'")
    parser.add_argument("--coordinators", type=int, default=None, metavar="N",
                        help="coordinator processes; overrides config 'coordinator_processes'")
    parser.add_argument("--provision-acl", action="store_true",
                        help="create or update the Redis ACL users (services, dashboard, --agents) "
                             "and exit; passwords go to <data_dir>/secrets/redis-acl")
    parser.add_argument("--admin-url", default=None,
                        help=f"Redis URL of an administrator for --provision-acl (default "
                             f"${ADMIN_URL_ENV}, else the running embedded server)")
    parser.add_argument("--agents", default="", metavar="ID,ID",
                        help="agent ids that get their own ACL user (with --provision-acl)")
    args = parser.parse_args(argv)
    for option, value in (("--workers", args.workers), ("--coordinators", args.coordinators)):
        if value is not None and value < 1:
            parser.error(f"{option} is {value}; must be >= 1")
    if (args.agents or args.admin_url) and not args.provision_acl:
        parser.error("--agents and --admin-url go with --provision-acl")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s deploy %(levelname)s %(message)s")
    try:
        settings = load_settings(args.config)
        if args.workers is not None:
            settings = settings.model_copy(update={"aggregator_workers": args.workers})
        if args.coordinators is not None:
            settings = settings.model_copy(update={"coordinator_processes": args.coordinators})
        if args.provision_acl:
            return _provision(settings, args.admin_url, args.agents)
        return run(settings, args.config)
    except (ConfigError, EmbeddedServerError, AclError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (BusUnreachable, BlobStoreUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _provision(settings: Settings, admin_url: str | None, agents: str) -> int:
    data_dir = settings.data_dir.resolve()
    running = read_deployment(data_dir).get("redis_url") if deployment_file(data_dir).exists() else None
    url = admin_url_for(settings, data_dir, admin_url, running)
    agent_ids = [agent.strip() for agent in agents.split(",") if agent.strip()]
    try:
        return provision_command(settings, data_dir, url, agent_ids)
    except RedisError as exc:
        print(f"error: provisioning the ACL users failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
