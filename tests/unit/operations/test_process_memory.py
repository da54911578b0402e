"""The aggregator keeps freed memory for the next round instead of faulting fresh pages in."""

import platform
import subprocess
import sys

import pytest

ROUND = """
import resource, sys, threading
import numpy as np
if sys.argv[1] == "retain":
    from federated_learning.services.process_memory import retain_freed_memory
    assert retain_freed_memory()
def page_faults_of_a_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [np.ones(1 << 20, np.float32) for _ in range(16)]  # 16 updates of 4 MiB, written
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
if sys.argv[2] == "same thread":
    page_faults_of_a_round()
    print(page_faults_of_a_round())
else:  # the first round on one thread, the second on another while the first still runs
    first_done, second_done, faults = threading.Event(), threading.Event(), []
    def first():
        page_faults_of_a_round()
        first_done.set()
        second_done.wait()
    thread = threading.Thread(target=first)
    thread.start()
    first_done.wait()
    second = threading.Thread(target=lambda: faults.append(page_faults_of_a_round()))
    second.start()
    second.join()
    second_done.set()
    thread.join()
    print(faults[0])
"""


def page_faults_of_a_second_round(mode: str, threads: str = "same thread") -> int:
    done = subprocess.run([sys.executable, "-c", ROUND, mode, threads], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_a_second_round_of_large_arrays_reuses_the_first_rounds_memory() -> None:
    pages_of_the_round = 16 * (4 << 20) // 4096

    assert page_faults_of_a_second_round("default") > pages_of_the_round // 2
    assert page_faults_of_a_second_round("retain") < pages_of_the_round // 20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_memory_one_thread_freed_is_reused_by_another() -> None:
    """One arena for all threads: what a job's thread freed serves the next round's reader."""
    pages_of_the_round = 16 * (4 << 20) // 4096

    assert page_faults_of_a_second_round("retain", "other threads") < pages_of_the_round // 20
