"""The launcher's supervisor on real child processes: a child that does not come up is
retried after its backoff; stopping goes tier by tier, and a child that ignores SIGTERM is
killed after the stop timeout."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from federated_learning.deploy import supervisor
from federated_learning.deploy.supervisor import Child, Supervisor

DEADLINE_S = 10.0
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def on_sigterm_write(name: str, record: Path) -> list[str]:
    """A child that appends ``name`` to ``record`` when it gets SIGTERM, then exits 0."""
    code = (f"import signal, sys, time\n"
            f"def stop(*_):\n"
            f"    open({str(record)!r}, 'a').write({name!r} + '\\n'); sys.exit(0)\n"
            f"signal.signal(signal.SIGTERM, stop)\n"
            f"open({str(record)!r} + '.{name}', 'w').close()\n"
            f"time.sleep(60)\n")
    return [sys.executable, "-c", code]


def poll_until(supervised: Supervisor, done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        supervised.poll()
        if done():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {DEADLINE_S:.0f}s")


def test_a_child_that_does_not_come_up_on_restart_is_retried_after_its_backoff(tmp_path: Path) -> None:
    readiness: list[int] = []

    def ready(child: Child) -> None:
        readiness.append(child.restarts)
        if child.restarts == 1:
            raise RuntimeError("not answering")

    child = Child("server", SLEEPER, tmp_path / "server.log", {}, ready=ready, backoff_s=0.05)
    supervised = Supervisor([child])
    supervised.start_all()
    first = child.pid
    assert first is not None and child.process is not None
    try:
        child.process.kill()
        poll_until(supervised, lambda: child.restarts == 2 and child.process is not None, "second restart")

        assert readiness == [0, 1, 2]
        assert child.pid != first
        assert len(child.history) == 2  # the death, then the failed start
        assert child.backoff_s == pytest.approx(0.05 * 2 * 2)  # doubled at each of the two failures
    finally:
        supervised.stop_all()
    assert child.process is not None and child.process.poll() is not None


def test_children_stop_tier_by_tier(tmp_path: Path) -> None:
    record = tmp_path / "stopped"
    names = ["front", "worker-0", "worker-1", "store"]
    children = [Child(name, on_sigterm_write(name, record), tmp_path / f"{name}.log", {}) for name in names]
    supervised = Supervisor(children)
    supervised.start_all()
    deadline = time.monotonic() + DEADLINE_S
    while not all(Path(f"{record}.{name}").exists() for name in names):  # handlers installed
        assert time.monotonic() < deadline, "children did not start"
        time.sleep(0.02)

    supervised.stop_all([children[:1], children[1:3], children[3:]])

    stopped = record.read_text().split()
    assert stopped[0] == "front" and stopped[-1] == "store"
    assert sorted(stopped[1:3]) == ["worker-0", "worker-1"]
    assert all(child.process is not None and child.process.returncode == 0 for child in children)


def test_a_child_that_ignores_sigterm_is_killed_after_the_stop_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "STOP_TIMEOUT_S", 0.5)
    ready_file = tmp_path / "ready"
    code = (f"import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"open({str(ready_file)!r}, 'w').close()\ntime.sleep(60)\n")
    child = Child("stubborn", [sys.executable, "-c", code], tmp_path / "stubborn.log", {})
    supervised = Supervisor([child])
    supervised.start_all()
    deadline = time.monotonic() + DEADLINE_S
    while not ready_file.exists():
        assert time.monotonic() < deadline, "child did not start"
        time.sleep(0.02)

    began = time.monotonic()
    supervised.stop_all()

    assert time.monotonic() - began < 0.5 + 2.0
    assert child.process is not None and child.process.returncode == -9
