"""Supervises child processes: restart with backoff when one dies, stop in order."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
STABLE_AFTER_S = 60.0
"""A child that ran this long before dying restarts with the initial backoff."""


@dataclass
class Child:
    name: str
    command: list[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    history: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("started %s (pid %d), log %s", self.name, self.process.pid, self.log_path)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


class Supervisor:
    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.stopping = False

    def start_all(self) -> None:
        for child in self.children:
            child.start()

    def poll(self) -> None:
        """Restart children that died (after their backoff); call this periodically."""
        now = time.monotonic()
        for child in self.children:
            if child.process is None:
                if child.restart_at is not None and now >= child.restart_at and not self.stopping:
                    child.restarts += 1
                    child.start()
                continue
            code = child.process.poll()
            if code is None or self.stopping:
                continue
            ran = now - child.started_at
            child.backoff_s = BACKOFF_START_S if ran >= STABLE_AFTER_S else min(child.backoff_s * 2, BACKOFF_CAP_S)
            child.restart_at = now + child.backoff_s
            child.history.append(time.time())
            child.process = None
            log.warning("%s exited with %s after %.1fs; restarting in %.1fs (restart #%d)",
                        child.name, code, ran, child.backoff_s, child.restarts + 1)

    def stop_all(self) -> None:
        """SIGTERM each child in list order, waiting for each to exit (then SIGKILL)."""
        self.stopping = True
        for child in self.children:
            process = child.process
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
                log.info("stopped %s", child.name)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.name, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
