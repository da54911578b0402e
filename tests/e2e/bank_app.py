"""A memory-bank app for the runner tests: agent ``<id>-<k>`` extracts ``100 * (k + 1)`` feature
rows around its own cluster centres (banks of different sizes); ``make_stalling`` takes its task,
says so in the file ``$FL_TEST_STALL_MARKER`` and never answers (the test kills it there)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from agents.app import Config

WIDTH = 8


class ClusterFeatures:
    def __init__(self, index: int, rows: int) -> None:
        rng = np.random.default_rng(index)
        centres = rng.normal(0.0, 5.0, (3, WIDTH))
        self.features = (centres[rng.integers(0, 3, rows)] + rng.normal(0.0, 0.3, (rows, WIDTH))).astype(np.float32)
        self.num_examples = rows

    def extract_features(self, config: Config) -> tuple[NDArray[np.float32], int]:
        return self.features, self.num_examples


def make(agent_id: str) -> ClusterFeatures:
    index = int(agent_id.rsplit("-", 1)[-1])
    return ClusterFeatures(index, 100 * (index + 1))


class Stalling(ClusterFeatures):
    def extract_features(self, config: Config) -> tuple[NDArray[np.float32], int]:
        Path(os.environ["FL_TEST_STALL_MARKER"]).write_text(str(os.getpid()))
        threading.Event().wait()  # killed here, in the middle of its task
        raise AssertionError("unreachable")


def make_stalling(agent_id: str) -> Stalling:
    return Stalling(99, 500)
