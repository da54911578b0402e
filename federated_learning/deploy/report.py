"""A pass/fail report of named checks: one line per check as it is made, a summary line, JSON."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str
    """Why it failed (or what was seen, when it passed)."""


class CheckReport:
    """Collects check results and writes each to ``out`` as ``PASS name`` or ``FAIL name: why``."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.results: list[CheckResult] = []
        self.started = time.monotonic()

    def check(self, name: str, problems: list[str], seen: str = "") -> bool:
        """Record ``name`` as passed when ``problems`` is empty, else failed with them; return passed."""
        detail = " ".join(("; ".join(problems) if problems else seen).split())
        result = CheckResult(name, not problems, detail)
        self.results.append(result)
        line = f"PASS {name}" + (f" ({detail})" if detail and result.passed else "")
        if not result.passed:
            line = f"FAIL {name}: {result.detail}"
        self.out.write(line + "\n")
        self.out.flush()
        return result.passed

    @property
    def passed(self) -> int:
        return sum(result.passed for result in self.results)

    @property
    def failed(self) -> int:
        return len(self.results) - self.passed

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> str:
        return f"{self.passed} passed, {self.failed} failed"

    def finish(self) -> None:
        """Write the summary line (with the runtime)."""
        self.out.write(f"{self.summary()} in {self.seconds:.1f}s\n")
        self.out.flush()

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failed": self.failed, "seconds": round(self.seconds, 2),
                "checks": [asdict(result) for result in self.results]}

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
