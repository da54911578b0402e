"""Supervises child processes: restart with backoff when one dies, stop in order."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0
"""How long one child gets to exit after SIGTERM before it is killed."""
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
STABLE_AFTER_S = 60.0
"""A child that ran this long before dying restarts with the initial backoff."""


@dataclass
class Child:
    """A supervised process. Each starts in a session of its own, so a signal to the launcher's
    process group (Ctrl-C, ``kill -TERM -<pgid>``) reaches the launcher alone, which then stops
    the children in its order."""

    name: str
    command: list[str]
    log_path: Path
    env: dict[str, str]
    ready: Callable[[Child], None] | None = None
    """Run after every start, first and restarts: waits until the child serves (e.g. answers
    PING) and redoes what its restart undid; raises when the child does not come up."""
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    history: list[float] = field(default_factory=list)

    def start(self) -> None:
        """Spawn the process and run ``ready``; when ``ready`` raises, kill it and re-raise."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("started %s (pid %d), log %s", self.name, self.process.pid, self.log_path)
        if self.ready is None:
            return
        try:
            self.ready(self)
        except BaseException:
            self.process.kill()
            self.process.wait()
            self.process = None
            raise

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


class Supervisor:
    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.stopping = False

    def start_all(self) -> None:
        """Start, in list order, every child not started yet."""
        for child in self.children:
            if child.process is None and child.restart_at is None:
                child.start()

    def poll(self) -> None:
        """Restart children that died (after their backoff); call this periodically."""
        for child in self.children:
            if self.stopping:
                return
            if child.process is None:
                if child.restart_at is not None and time.monotonic() >= child.restart_at:
                    child.restarts += 1
                    self._restart(child)
                continue
            code = child.process.poll()
            if code is not None:
                child.process = None
                self._schedule_restart(child, f"exited with {code}")

    def _restart(self, child: Child) -> None:
        try:
            child.start()
        except Exception as exc:  # noqa: BLE001 - whatever its start raised, the child is down: retry later
            self._schedule_restart(child, f"did not come up ({exc})")

    def _schedule_restart(self, child: Child, what: str) -> None:
        now = time.monotonic()
        ran = now - child.started_at
        child.backoff_s = BACKOFF_START_S if ran >= STABLE_AFTER_S else min(child.backoff_s * 2, BACKOFF_CAP_S)
        child.restart_at = now + child.backoff_s
        child.history.append(time.time())
        log.warning("%s %s after %.1fs; restarting in %.1fs (restart #%d)",
                    child.name, what, ran, child.backoff_s, child.restarts + 1)

    def stop_all(self, tiers: Sequence[Sequence[Child]] | None = None) -> None:
        """Stop the children tier by tier (default: one at a time, in list order): SIGTERM every
        child of a tier, wait until all have exited (SIGKILL whoever is still running after
        ``STOP_TIMEOUT_S``), then the next tier. A child waiting for its restart stays down."""
        self.stopping = True
        for child in self.children:
            child.restart_at = None
        for tier in tiers if tiers is not None else [[child] for child in self.children]:
            self._stop_tier(tier)

    def _stop_tier(self, tier: Sequence[Child]) -> None:
        began = time.monotonic()
        running = [(child, child.process) for child in tier
                   if child.process is not None and child.process.poll() is None]
        for _child, process in running:
            process.send_signal(signal.SIGTERM)
        for child, process in running:
            try:
                code = process.wait(max(0.0, began + STOP_TIMEOUT_S - time.monotonic()))
                log.info("stopped %s in %.1fs (exit code %d)", child.name, time.monotonic() - began, code)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.name, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
