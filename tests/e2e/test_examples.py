"""Every example's one command, as a user runs it: it deploys the system, trains, and ends with
its test accuracy line, which must reach the accuracy its README states."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

EXAMPLES = [
    # (command, the line it ends with, the accuracy its README states)
    (["examples/pytorch_digits/run.py"], "test accuracy", 0.90),
    (["examples/sklearn_flower/run.py"], "test accuracy", 0.90),
    (["examples/http_bot/run.py"], "test accuracy", 0.90),
    (["scripts/demo.py"], "final test accuracy", 0.90),
]


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("command", "line", "accuracy"), EXAMPLES, ids=lambda value: str(value))
def test_the_example_trains_to_its_stated_accuracy(command: list[str], line: str, accuracy: float,
                                                   tmp_path: Path) -> None:
    env = {**os.environ, "FL_EXAMPLES_DATA_DIR": str(tmp_path), "FL_DASHBOARD_PORT": str(free_port()),
           "FL_REDIS_EMBEDDED_PORT": str(free_port()), "FL_METRICS_PORT_BASE": "0", "FL_REDIS_URL": ""}
    if command[0] == "scripts/demo.py":
        env["FL_DEMO_DATA_DIR"] = str(tmp_path / "demo")
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=380, check=False)
    output = result.stdout + result.stderr
    found = re.findall(rf"^{line}: (\d\.\d+)$", result.stdout, flags=re.MULTILINE)
    assert result.returncode == 0 and found, output[-4000:]
    assert float(found[-1]) >= accuracy, output[-4000:]


@pytest.mark.timeout(400)
def test_the_memory_bank_example_finds_the_unseen_digit_as_well_as_a_pooled_bank(tmp_path: Path) -> None:
    env = {**os.environ, "FL_EXAMPLES_DATA_DIR": str(tmp_path), "FL_DASHBOARD_PORT": str(free_port()),
           "FL_REDIS_EMBEDDED_PORT": str(free_port()), "FL_METRICS_PORT_BASE": "0", "FL_REDIS_URL": ""}
    result = subprocess.run([sys.executable, "examples/memory_bank_digits/run.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=380, check=False)
    output = result.stdout + result.stderr
    found = re.findall(r"^federated AUROC: (\d\.\d+) \(central (\d\.\d+), difference ([+-]\d\.\d+)\)$",
                       result.stdout, flags=re.MULTILINE)
    assert result.returncode == 0 and found, output[-4000:]
    federated, _central, difference = (float(value) for value in found[-1])
    assert federated >= 0.90 and difference >= -0.02, output[-4000:]
