"""Settings: ``config.json`` at the top level, every key overridable by ``FL_<KEY>``.

Loaded once in each process's ``main()`` and passed down; library code never
imports a module-level settings instance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from federated_learning.protocol.storage import BUCKET_NAME, ENDPOINT_URL

CONFIG_FILE_ENV = "FL_CONFIG_FILE"
DEFAULT_CONFIG_FILE = Path("config.json")
SECRETS_DIR_ENV = "FL_SECRETS_DIR"
"""A folder of owner-only files, one per setting, each named like the setting's variable
(``FL_REDIS_URL``): how the launcher hands each service its secrets without its environment."""
REDIS_ADMIN_URL_ENV = "FL_REDIS_ADMIN_URL"
SECRET_ENVIRONMENT = frozenset({"FL_API_KEY", "FL_REDIS_URL", REDIS_ADMIN_URL_ENV})
"""Variables that may hold a secret: the settings ``api_key`` and ``redis_url``, and an admin URL."""

SERVICE_PORT_OFFSETS = {
    "coordinator": 1,
    "aggregator": 2,
    "privacy": 3,
    "versions": 4,
    "monitor": 5,
}
AGGREGATOR_WORKER_PORT_OFFSET = 10
COORDINATOR_INSTANCE_PORT_OFFSET = 80
"""Coordinator process k >= 1 serves its metrics on metrics_port_base + 80 + k (after the at most
64 aggregator workers' ports); process 0 on the coordinator's own port."""
MIN_API_KEY_LENGTH = 16
PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "secret", "password", "api-key", "apikey",
                                 "your-api-key", "xxxxxxxxxxxxxxxx", "0000000000000000"})


TLS_FILE_KEYS = ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file",
                 "dashboard_tls_cert_file", "dashboard_tls_key_file", "dashboard_tls_ca_file")
AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key."""


class Settings(BaseSettings):
    """Everything a deployment is configured with."""

    model_config = SettingsConfigDict(env_prefix="FL_", extra="forbid", validate_default=True)

    redis_url: str = Field(default="", description="empty: start the embedded valkey-server")
    redis_key_prefix: str = Field(default="fl", pattern=r"^[A-Za-z0-9_\-]{1,32}$")
    redis_embedded_port: int = Field(default=0, ge=0, le=65535, description="0: any free port")
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = None
    redis_connect_attempts: int = Field(default=20, ge=1, le=1000)
    redis_acl: bool = Field(
        default=True, description="each role connects as its own ACL user (services, dashboard, "
                                  "agent-<id>), so agents never hold the services' password. Default: "
                                  "on with the embedded server (which starts with these users), off "
                                  "with an external redis_url (provision its users first: "
                                  "docs/operations.md). Off, every agent logs in with the services' "
                                  "password and may read, change or delete any key of the deployment")
    redis_acl_agents: list[Annotated[str, Field(pattern=AGENT_ID_PATTERN)]] = Field(
        default_factory=list, description="agent ids whose ACL users the launcher provisions "
                                          "at start (e.g. the demo's simulated agents)")

    cpu_cores: int = Field(default=12, ge=1, le=1024)
    aggregator_workers: int = Field(default=1, ge=1, le=64)
    max_concurrent_trainings: int = Field(default=3, ge=1, le=1000)
    default_privacy_level: Literal["none", "low", "medium", "high"] = "medium"

    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(default=8080, ge=0, le=65535)
    max_sockets_per_key: int = Field(default=256, ge=1, le=100_000,
                                     description="live WebSockets one API key may hold at once")
    dashboard_tls_cert_file: Path | None = Field(default=None, description="serve HTTPS with this "
                                                 "certificate (PEM, chain included)")
    dashboard_tls_key_file: Path | None = None
    dashboard_tls_ca_file: Path | None = Field(
        default=None, description="CA bundle local clients (launcher health check, simulated "
                                  "agents) verify the dashboard with; empty: the system store")
    metrics_port_base: int = Field(
        default=9100, ge=0, le=65000, description="service i exports on base+offset; 0: any free port"
    )

    min_clients_per_round: int = Field(default=3, ge=1)
    max_clients_per_round: int = Field(default=20, ge=1)
    heartbeat_interval_s: float = Field(default=30.0, gt=0, le=3600)
    heartbeat_timeout_s: float = Field(default=90.0, gt=0, le=86400)
    round_deadline_s: float = Field(default=120.0, gt=0, le=86400)
    claim_idle_ms: int = Field(default=15_000, ge=100)
    max_blob_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    blob_dir: Path | None = Field(
        default=None, description="keep models and uploads as files in this folder instead of in "
                                  "Redis, for agents on the services' host or a filesystem they share: "
                                  "uploads then skip the bus, Redis's memory and its append-only file. "
                                  "Agents find it by themselves; agents that cannot see the folder "
                                  "train through the HTTP gateway. Empty: in Redis")
    blob_bucket: str | None = Field(
        default=None, pattern=BUCKET_NAME,
        description="keep models and uploads in this bucket of an S3-compatible object store (AWS S3, "
                    "MinIO, ...) under the deployment's prefix, for agents on other machines: uploads then "
                    "skip the bus. Credentials: the standard AWS chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, a "
                    "role). Agents find it by themselves. Empty: in Redis (or blob_dir)")
    blob_endpoint_url: str | None = Field(
        default=None, pattern=ENDPOINT_URL,
        description="the object store's URL (MinIO and the like, e.g. http://minio:9000); empty: AWS S3")
    blob_region: str | None = Field(default=None, pattern=r"^[a-z0-9\-]{1,64}$",
                                    description="the bucket's region; empty: the AWS chain's")
    coordinator_lease_s: float = Field(
        default=10.0, gt=1, le=600,
        description="a partition's coordinator works alone; a standby takes over this long after it stopped renewing")
    coordinator_partitions: int = Field(
        default=1, ge=1, le=64,
        description="trainings are split into this many partitions, each worked on by one coordinator "
                    "process at a time; several coordinator processes share the partitions. Fixed when a "
                    "deployment first starts")
    coordinator_processes: int = Field(
        default=1, ge=1, le=64,
        description="coordinator processes the launcher starts on this host; they share the "
                    "partitions (coordinator_partitions), and with one partition all but one stand by")
    aggregator_cache_bytes: int = Field(
        default=1024 * 1024 * 1024, ge=0, le=1 << 40,
        description="accepted updates an aggregator keeps in memory, checked, for their round's job "
                    "(read while the round collects); beyond it a job fetches its updates itself")
    require_join_token: bool = Field(
        default=False, description="new agents need a join token issued by the operator")
    max_first_joins_per_minute: int = Field(
        default=600, ge=1, le=1_000_000,
        description="new agent ids one credential may register per minute (a join token; all open "
                    "registrations together count as one); further first joins are refused with "
                    "join_rate_limited and the agent's periodic re-join retries")
    require_signed_updates: bool = Field(
        default=True, description="refuse update notices without a valid Ed25519 signature")

    api_key: str = Field(default="", description="key for control endpoints; empty: the launcher "
                                                  "generates one per deployment")
    checkpoint_keep_last: int = Field(default=0, ge=0, description="0: keep every checkpoint")
    checkpoint_keep_best: int = Field(default=3, ge=0)
    data_dir: Path = Path("data")
    validation_data_dir: Path | None = Field(
        default=None, description="the folder a training's validation_data names a file in; "
                                  "default <data_dir>/validation")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("blob_dir", mode="before")
    @classmethod
    def _absolute_folder(cls, value: object) -> Path | None:
        """Agents are told this path: relative, it would mean another folder to each of them."""
        if value is None or value == "":
            return None
        if not isinstance(value, str | Path):
            raise ValueError("a folder's path")  # noqa: TRY004 - pydantic reports a ValueError as a validation error
        folder = Path(os.path.abspath(Path(value).expanduser()))  # links kept: agents may mount this path
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        return folder

    @field_validator("blob_bucket", "blob_endpoint_url", "blob_region", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _one_blob_store(self) -> Settings:
        if self.blob_dir is not None and self.blob_bucket is not None:
            raise ValueError("blob_dir and blob_bucket both set: a deployment keeps its blobs in one store")
        if self.blob_bucket is None and (self.blob_endpoint_url or self.blob_region):
            raise ValueError("blob_endpoint_url and blob_region need blob_bucket")
        return self

    @field_validator(*TLS_FILE_KEYS)
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("no such file")
        return value

    @model_validator(mode="before")
    @classmethod
    def _acl_by_default_on_the_embedded_server(cls, data: Any) -> Any:
        if isinstance(data, dict) and "redis_acl" not in data:
            return {**data, "redis_acl": not data.get("redis_url")}
        return data

    @model_validator(mode="after")
    def _tls_consistent(self) -> Settings:
        for cert, key in (("redis_tls_cert_file", "redis_tls_key_file"),
                          ("dashboard_tls_cert_file", "dashboard_tls_key_file")):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                given, missing = (cert, key) if getattr(self, cert) is not None else (key, cert)
                raise ValueError(f"'{given}' is set but '{missing}' is not; "
                                 "a certificate and its key go together")
        redis_tls = [key for key in TLS_FILE_KEYS[:3] if getattr(self, key) is not None]
        if redis_tls and not self.redis_url.startswith("rediss://"):
            scheme = self.redis_url.split("://")[0] + "://" if self.redis_url else ""
            raise ValueError(f"'{redis_tls[0]}' is set but redis_url is not rediss:// "
                             f"({scheme or 'empty: the embedded server, which has no TLS'})")
        if self.dashboard_tls_ca_file is not None and self.dashboard_tls_cert_file is None:
            raise ValueError("'dashboard_tls_ca_file' is set but the dashboard serves plain HTTP "
                             "(no 'dashboard_tls_cert_file')")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.min_clients_per_round > self.max_clients_per_round:
            raise ValueError(
                f"min_clients_per_round ({self.min_clients_per_round}) must not exceed "
                f"max_clients_per_round ({self.max_clients_per_round})"
            )
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        if self.api_key and (len(self.api_key) < MIN_API_KEY_LENGTH
                             or self.api_key.lower() in PLACEHOLDER_SECRETS):
            raise ValueError(f"api_key must be a real secret of at least {MIN_API_KEY_LENGTH} characters, "
                             "not a placeholder (leave it empty to have one generated)")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url '{self.redis_url}' must start with redis://, rediss:// or unix://")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The JSON file arrives as init kwargs; the environment and then the files of
        # $FL_SECRETS_DIR override it.
        return env_settings, file_secret_settings, init_settings

    @property
    def validation_folder(self) -> Path:
        return self.validation_data_dir or self.data_dir / "validation"

    @property
    def uses_embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def dashboard_scheme(self) -> str:
        return "https" if self.dashboard_tls_cert_file is not None else "http"

    def metrics_port(self, service: str, worker: int = 0) -> int:
        """Port on which instance ``worker`` of ``service`` exports Prometheus metrics (0: pick a
        free one)."""
        if self.metrics_port_base == 0:
            return 0
        if service == "aggregator":
            return self.metrics_port_base + AGGREGATOR_WORKER_PORT_OFFSET + worker
        if service == "coordinator" and worker > 0:
            return self.metrics_port_base + COORDINATOR_INSTANCE_PORT_OFFSET + worker
        return self.metrics_port_base + SERVICE_PORT_OFFSETS[service]


def _describe(error: ErrorDetails) -> str:
    key = ".".join(str(part) for part in error.get("loc", ())) or "(config)"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        return f"config key '{key}' is unknown"
    if key == "(config)":
        return f"config: {message}"
    return f"config '{key}' is {error.get('input')!r}: {message}"


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read the config file (``path``, ``$FL_CONFIG_FILE`` or ./config.json) and the environment.

    Raises :class:`ConfigError` with one line naming the offending key.
    """
    path = path or Path(os.environ.get(CONFIG_FILE_ENV, DEFAULT_CONFIG_FILE))
    values: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        values.update(loaded)
    elif path != DEFAULT_CONFIG_FILE:
        raise ConfigError(f"config file {path} does not exist")
    values.update(overrides)
    secrets_dir = os.environ.get(SECRETS_DIR_ENV) or None
    if secrets_dir is not None and not Path(secrets_dir).is_dir():
        raise ConfigError(f"${SECRETS_DIR_ENV} is {secrets_dir!r}: no such folder")
    # BaseSettings takes the folder as an init argument of its own, not a field.
    values["_secrets_dir"] = secrets_dir
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from exc


def without_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less the variables that may hold a secret (for a child process's environment)."""
    return {name: value for name, value in environ.items() if name not in SECRET_ENVIRONMENT}
