"""Create ``.venv`` and install the project into it; needs nothing but python3 (3.11+).

Used by ``scripts/demo.py`` and ``scripts/test.py``: they run under the system
python3, call :func:`ensure_venv`, and re-run themselves with the venv's python.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
MIN_PYTHON = (3, 11)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _project_hash() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]


def _installed(stamp_file: Path) -> tuple[bool, set[str]]:
    """Whether the install is of the current pyproject.toml, and the extras it had."""
    if not stamp_file.exists():
        return False, set()
    project, _, extras = stamp_file.read_text().partition(" ")
    return project == _project_hash(), set(filter(None, extras.split(",")))


def ensure_venv(extras: str = "") -> Path:
    """Create the venv if missing and install the project with ``extras`` (comma-separated) when
    pyproject.toml changed or an extra is missing. Extras installed before are kept, so the demo,
    the examples and the tests share one setup instead of reinstalling in turn."""
    if sys.version_info < MIN_PYTHON:
        sys.exit(f"python {'.'.join(map(str, MIN_PYTHON))} or newer is needed; this is {sys.version.split()[0]}")
    if not venv_python().exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp_file = VENV / ".installed"
    current, installed = _installed(stamp_file)
    wanted = set(filter(None, extras.split(",")))
    if not current or not wanted <= installed:
        keep = wanted | installed
        target = f".[{','.join(sorted(keep))}]" if keep else "."
        print(f"installing the project into {VENV} (pip install -e '{target}'); this takes a minute "
              "or two the first time", flush=True)
        pip = [str(venv_python()), "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "install", "-U", "pip"], check=True, cwd=ROOT)
        subprocess.run([*pip, "install", "-e", target], check=True, cwd=ROOT)
        stamp_file.write_text(f"{_project_hash()} {','.join(sorted(keep))}")
    return venv_python()


def reexec_in_venv(extras: str = "") -> None:
    """Make sure the venv exists, then continue this script under its python."""
    python = ensure_venv(extras)
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(python), [str(python), *sys.argv])
