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


def _stamp(extras: str) -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    return digest[:16]


def ensure_venv(extras: str = "") -> Path:
    """Create the venv if missing and (re)install the project when pyproject.toml changed."""
    if sys.version_info < MIN_PYTHON:
        sys.exit(f"python {'.'.join(map(str, MIN_PYTHON))} or newer is needed; this is {sys.version.split()[0]}")
    if not venv_python().exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp_file = VENV / ".installed"
    wanted = _stamp(extras)
    if not stamp_file.exists() or stamp_file.read_text() != wanted:
        target = f".[{extras}]" if extras else "."
        print(f"installing the project into {VENV} (pip install -e '{target}')", flush=True)
        pip = [str(venv_python()), "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "install", "-U", "pip"], check=True, cwd=ROOT)
        subprocess.run([*pip, "install", "-e", target], check=True, cwd=ROOT)
        stamp_file.write_text(wanted)
    return venv_python()


def reexec_in_venv(extras: str = "") -> None:
    """Make sure the venv exists, then continue this script under its python."""
    python = ensure_venv(extras)
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(python), [str(python), *sys.argv])
