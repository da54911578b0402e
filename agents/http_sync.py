"""A plain-HTTP sync client for simple bots (seed 000's daily sync): ``python -m agents.http_sync``.

Reads its settings from the environment, as the seed names them: ``ENABLE_FED_LEARNING``,
``FED_SERVER_URL``, ``FED_CLIENT_ID`` (default: host name), ``FED_LOCAL_MODEL_PATH``,
``FED_MERGED_MODEL_PATH``, ``FED_SYNC_HOUR``, ``FED_SYNC_MINUTE``; plus ``FED_API_KEY`` (the
deployment's key), ``FED_TRAINING_ID``, ``FED_NUM_EXAMPLES`` and ``FED_CA_BUNDLE`` (the CA file
that signed an ``https://`` server's certificate; default: the system's CAs) (optional). Once a day at that
time (or now with ``--once``) it posts the local model (safetensors) to ``/sync_model`` and
writes the merged model it gets back atomically, in safetensors (never pickle); when the
server is down it retries with exponential backoff.

A bot that evaluates its local model may write ``{"accuracy": ..., "loss": ..., "num_examples": ...}``
(any of them) to ``<local model>.metrics.json``; each sync sends those as ``X-Accuracy``, ``X-Loss``
and ``X-Num-Examples`` (which then overrides ``FED_NUM_EXAMPLES``). A value out of range is left out,
with a warning, rather than getting the whole update refused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from federated_learning.protocol.tensors import decode_layers, digest_of
from federated_learning.records.checkpoints import atomic_write

log = logging.getLogger("agents.http_sync")

MAX_ATTEMPTS = 8
BACKOFF_START_S = 1.0
BACKOFF_CAP_S = 300.0
MAX_MODEL_BYTES = 1 << 30
MAX_NUM_EXAMPLES = 1_000_000_000


class SyncFailed(RuntimeError):
    """The server refused the update or stayed unreachable through every retry."""


@dataclass(frozen=True)
class SyncSettings:
    enabled: bool
    server_url: str
    client_id: str
    local_model_path: Path
    merged_model_path: Path
    sync_hour: int
    sync_minute: int
    api_key: str
    training_id: str | None
    num_examples: int
    ca_bundle: Path | None = None

    def verify(self) -> ssl.SSLContext | bool:
        """How httpx verifies an https server: against ``ca_bundle``, else the system's CAs."""
        if self.ca_bundle is None:
            return True
        if not self.ca_bundle.is_file():
            raise ValueError(f"FED_CA_BUNDLE is {str(self.ca_bundle)!r}; no such file")
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None) -> SyncSettings:
        env = dict(os.environ if env is None else env)

        def number(name: str, default: int, low: int, high: int) -> int:
            raw = env.get(name, str(default))
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{name} is {raw!r}; must be an integer") from None
            if not low <= value <= high:
                raise ValueError(f"{name} is {value}; must be in [{low}, {high}]")
            return value

        return cls(
            enabled=env.get("ENABLE_FED_LEARNING", "false").lower() in ("1", "true", "yes"),
            server_url=env.get("FED_SERVER_URL", "http://127.0.0.1:8080").rstrip("/"),
            client_id=env.get("FED_CLIENT_ID") or socket.gethostname().replace(".", "-")[:48],
            local_model_path=Path(env.get("FED_LOCAL_MODEL_PATH", "model.safetensors")),
            merged_model_path=Path(env.get("FED_MERGED_MODEL_PATH", "merged_model.safetensors")),
            sync_hour=number("FED_SYNC_HOUR", 3, 0, 23),
            sync_minute=number("FED_SYNC_MINUTE", 0, 0, 59),
            api_key=env.get("FED_API_KEY", ""),
            training_id=env.get("FED_TRAINING_ID") or None,
            num_examples=number("FED_NUM_EXAMPLES", 1, 1, MAX_NUM_EXAMPLES),
            ca_bundle=Path(env["FED_CA_BUNDLE"]) if env.get("FED_CA_BUNDLE") else None,
        )


def seconds_until(hour: int, minute: int, now: dt.datetime) -> float:
    """Seconds from ``now`` to the next ``hour:minute`` (today, else tomorrow)."""
    target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if target <= now:
        target += dt.timedelta(days=1)
    return (target - now).total_seconds()


def version_file(merged_model_path: Path) -> Path:
    """Beside the merged model: which training and version it is."""
    return merged_model_path.with_name(merged_model_path.name + ".version.json")


def read_merged_version(merged_model_path: Path) -> tuple[str, int] | None:
    """(training id, version) of the merged model written last; None when unknown or unreadable."""
    try:
        record = json.loads(version_file(merged_model_path).read_text())
        return str(record["training_id"]), int(record["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def metrics_file(local_model_path: Path) -> Path:
    """Beside the local model: the bot's own evaluation of it, sent along with it."""
    return local_model_path.with_name(local_model_path.name + ".metrics.json")


def metric_headers(local_model_path: Path) -> dict[str, str]:
    """``X-Accuracy``, ``X-Loss`` and ``X-Num-Examples`` from the metrics file, for the values it holds
    in range (accuracy in [0, 1], loss finite and >= 0, num_examples an integer in [1, 1e9]); a value
    out of range, or an unreadable file, is left out with a warning."""
    path = metrics_file(local_model_path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("metrics file %s is unreadable (%s); syncing without metrics", path, exc)
        return {}
    if not isinstance(record, dict):
        log.warning("metrics file %s holds no JSON object; syncing without metrics", path)
        return {}
    headers: dict[str, str] = {}
    for key, header, high in (("accuracy", "X-Accuracy", 1.0), ("loss", "X-Loss", math.inf)):
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and 0.0 <= value <= high:
            headers[header] = repr(float(value))
        else:
            log.warning("metrics file %s: %s is %r; not sent", path, key, value)
    examples = record.get("num_examples")
    if isinstance(examples, int) and not isinstance(examples, bool) and 1 <= examples <= MAX_NUM_EXAMPLES:
        headers["X-Num-Examples"] = str(examples)
    elif examples is not None:
        log.warning("metrics file %s: num_examples is %r; sending FED_NUM_EXAMPLES", path, examples)
    return headers


def sync_once(settings: SyncSettings, client: httpx.Client, *, sleep: object = time.sleep,
              attempts: int = MAX_ATTEMPTS) -> Path:
    """Post the local model (with the metrics beside it, if any); write the merged model; return its
    path. Tries up to ``attempts`` times while the server is unreachable or busy (5xx, 409), with
    backoff from 1 s doubling up to 300 s; raises :class:`SyncFailed` naming the last problem."""
    body = settings.local_model_path.read_bytes()
    headers = _headers(settings)
    delay = BACKOFF_START_S
    for attempt in range(1, attempts + 1):
        try:
            response = client.post(f"{settings.server_url}/sync_model", content=body, headers=headers)
        except httpx.TransportError as exc:
            problem = f"server {settings.server_url} unreachable ({exc or type(exc).__name__})"
        else:
            if response.status_code == 200:
                return _write_merged(settings, response)
            if response.status_code < 500 and response.status_code != 409:
                raise SyncFailed(f"server refused the update ({response.status_code}): {response.text[:300]}")
            problem = f"{response.status_code} {response.text[:200]}"
        if attempt == attempts:
            raise SyncFailed(f"no successful sync after {attempts} attempts; last: {problem}")
        log.warning("sync attempt %d/%d: %s; retrying in %.0fs", attempt, attempts, problem, delay)
        sleep(delay)  # type: ignore[operator]
        delay = min(delay * 2, BACKOFF_CAP_S)
    raise SyncFailed(f"attempts is {attempts}; must be >= 1")


def _headers(settings: SyncSettings) -> dict[str, str]:
    headers = {"Content-Type": "application/octet-stream", "X-Client-Id": settings.client_id,
               "X-Num-Examples": str(settings.num_examples), "Authorization": f"Bearer {settings.api_key}",
               **metric_headers(settings.local_model_path)}
    if settings.training_id:
        headers["X-Training-Id"] = settings.training_id
    base = read_merged_version(settings.merged_model_path)
    if base is not None and (not settings.training_id or base[0] == settings.training_id):
        # The local model was trained from the merged model we wrote last: say which version,
        # so the server re-bases a late update instead of taking it as trained on the newest.
        headers["X-Base-Version"] = str(base[1])
    return headers


def _write_merged(settings: SyncSettings, response: httpx.Response) -> Path:
    data = response.content
    expected = response.headers.get("X-Model-SHA256")
    if expected and digest_of(data) != expected:
        raise SyncFailed("the merged model does not match the hash the server announced")
    decode_layers(data, max_bytes=MAX_MODEL_BYTES)
    atomic_write(settings.merged_model_path, data)
    training_id, version = response.headers.get("X-Training-Id"), response.headers.get("X-Model-Version")
    if training_id and version and version.isdigit():
        atomic_write(version_file(settings.merged_model_path),
                     json.dumps({"training_id": training_id, "version": int(version)}).encode())
    log.info("client %s: merged model version %s of training %s written to %s",
             settings.client_id, response.headers.get("X-Model-Version"),
             response.headers.get("X-Training-Id"), settings.merged_model_path)
    return settings.merged_model_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true",
                        help="sync now and exit: 0 on success, 1 with one line on stderr on failure "
                             "(for cron or a systemd timer)")
    parser.add_argument("--attempts", type=int, default=MAX_ATTEMPTS, metavar="N",
                        help=f"tries per sync while the server is unreachable or busy, backoff from "
                             f"{BACKOFF_START_S:.0f} s doubling up to {BACKOFF_CAP_S:.0f} s "
                             f"(default: {MAX_ATTEMPTS})")
    args = parser.parse_args(argv)
    if args.attempts < 1:
        parser.error(f"--attempts is {args.attempts}; must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s http_sync %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        settings = SyncSettings.from_environment()
        verify = settings.verify()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not settings.enabled:
        log.info("ENABLE_FED_LEARNING is not set; nothing to do")
        return 0
    with httpx.Client(timeout=60.0, verify=verify) as client:
        if args.once:
            return _sync_now(settings, client, args.attempts)
        while True:
            wait = seconds_until(settings.sync_hour, settings.sync_minute, dt.datetime.now())
            log.info("next sync at %02d:%02d (in %.0fs)", settings.sync_hour, settings.sync_minute, wait)
            time.sleep(wait)
            try:
                sync_once(settings, client, attempts=args.attempts)
            except (SyncFailed, OSError, ValueError) as exc:
                log.error("client %s: sync failed: %s", settings.client_id, exc)


def _sync_now(settings: SyncSettings, client: httpx.Client, attempts: int) -> int:
    """``--once``: 0 when the merged model is written, else 1 and the reason in one line."""
    try:
        sync_once(settings, client, attempts=attempts)
    except FileNotFoundError as exc:
        print(f"error: sync failed: no local model at {exc.filename} (FED_LOCAL_MODEL_PATH)", file=sys.stderr)
        return 1
    except (SyncFailed, OSError, ValueError) as exc:
        print(f"error: sync failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
