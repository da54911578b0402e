#!/usr/bin/env python3
"""Set up .venv (with the test extras) and run the whole test suite.

Usage: python3 scripts/test.py [pytest arguments]
Exits non-zero on any failure, including "no tests collected".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import ROOT, reexec_in_venv

PYTEST_NO_TESTS_COLLECTED = 5


def main() -> int:
    reexec_in_venv("test,torch")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(ROOT / "data" / "numba-cache")}
    code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], check=False,
                          cwd=ROOT, env=env).returncode
    if code == PYTEST_NO_TESTS_COLLECTED:
        print("error: pytest collected no tests", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
