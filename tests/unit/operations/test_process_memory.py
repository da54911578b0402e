"""The aggregator keeps freed memory for the next round instead of faulting fresh pages in."""

import platform
import subprocess
import sys

import pytest

ROUND = """
import resource, sys
import numpy as np
if sys.argv[1] == "retain":
    from federated_learning.services.process_memory import retain_freed_memory
    assert retain_freed_memory()
def page_faults_of_a_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [np.ones(1 << 20, np.float32) for _ in range(16)]  # 16 updates of 4 MiB, written
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
page_faults_of_a_round()
print(page_faults_of_a_round())
"""


def page_faults_of_a_second_round(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", ROUND, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_a_second_round_of_large_arrays_reuses_the_first_rounds_memory() -> None:
    pages_of_the_round = 16 * (4 << 20) // 4096

    assert page_faults_of_a_second_round("default") > pages_of_the_round // 2
    assert page_faults_of_a_second_round("retain") < pages_of_the_round // 20
