"""scripts/test-federated-system.py: against the deployment it starts itself, and against a given one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Deployment

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "test-federated-system.py"
RUN_TIMEOUT_S = 150
SMALL_BLOB_LIMIT = 1 << 20


def run_script(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(report)],
                            check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=ROOT)
    return result, json.loads(report.read_text()) if report.exists() else {}


def failure_text(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-3000:]}"


def test_the_default_run_deploys_the_system_and_passes_every_check(tmp_path: Path) -> None:
    result, report = run_script(tmp_path)

    assert result.returncode == 0, failure_text(result)
    assert report["failed"] == 0 and report["passed"] >= 50, failure_text(result)
    names = " | ".join(check["name"] for check in report["checks"])
    for expected in ("contributors are its own agents, of every kind", "accuracy above 0.8",
                     "prometheus round counter moved", "cannot subscribe to", "HTTP sync client cannot post into",
                     "expired API key is refused", "revoked API key is refused", "viewer key cannot stop",
                     "over max_blob_bytes", "operator stops its own training"):
        assert expected in names, expected
    assert re.fullmatch(rf"{report['passed']} passed, 0 failed in [0-9.]+s", result.stdout.splitlines()[-1])
    assert len([line for line in result.stdout.splitlines() if line.startswith("PASS ")]) == report["passed"]


def test_a_given_deployment_is_tested_and_a_failed_check_fails_the_run(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path / "data")
    deployment.data_dir.mkdir(parents=True)
    deployment.env.update({"FL_MAX_BLOB_BYTES": str(SMALL_BLOB_LIMIT), "FL_HEARTBEAT_TIMEOUT_S": "30"})
    deployment.start()
    try:
        result, report = run_script(tmp_path, "--deployment", str(deployment.data_dir / "run" / "deployment.json"),
                                    "--rounds", "2", "--agents-per-org", "2", "--min-accuracy", "1.01",
                                    "--max-blob-bytes", str(SMALL_BLOB_LIMIT))
    finally:
        deployment.stop()

    assert result.returncode == 1, failure_text(result)
    failed = [check for check in report["checks"] if not check["passed"]]
    assert [check["name"].split(": ", 1)[1] for check in failed] == ["accuracy above 1.01"] * 2, failure_text(result)
    assert all("below 1.01" in check["detail"] for check in failed)
    assert f"FAIL {failed[0]['name']}: {failed[0]['detail']}" in result.stdout
    assert result.stdout.splitlines()[-1].startswith(f"{report['passed']} passed, 2 failed")
