#!/usr/bin/env python3
"""Set up .venv (with the test extras) and run the whole test suite.

Usage: python3 scripts/test.py [pytest arguments]

Without arguments: every test, then ruff and mypy. With arguments: pytest with them (e.g. a
file or -k EXPR), no static checks. Exits non-zero on any failure, including "no tests collected".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import ROOT, reexec_in_venv

PYTEST_NO_TESTS_COLLECTED = 5


STATIC_CHECKS = (
    ("ruff", ["-m", "ruff", "check", "federated_learning", "agents", "scripts", "examples", "tests"]),
    ("mypy", ["-m", "mypy", "federated_learning", "agents", "examples"]),
)


def main() -> int:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(__doc__)
        return 0
    reexec_in_venv("test,torch")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(ROOT / "data" / "numba-cache")}
    print("running the tests (unit, integration against a real valkey-server, end to end)", flush=True)
    code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], check=False,
                          cwd=ROOT, env=env).returncode
    if code == PYTEST_NO_TESTS_COLLECTED:
        print("error: pytest collected no tests", file=sys.stderr)
        return 1
    if sys.argv[1:]:  # a chosen subset of tests: no static checks
        return code
    for name, command in STATIC_CHECKS:
        print(f"{name}: {' '.join(command[2:])}", flush=True)
        if subprocess.run([sys.executable, *command], check=False, cwd=ROOT).returncode != 0:
            print(f"error: {name} failed", file=sys.stderr)
            code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
