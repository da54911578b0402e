"""A synthetic user model for benchmarks: d float32 parameters whose training costs nothing.

``fit`` returns the received layers plus a small deterministic step (one number per agent and
round, added to every coordinate), so a round measures the system around the model: sending,
checking, uploading and aggregating d-parameter updates. ``scripts/benchmark-rounds.py`` runs
it as agents (``python -m agents run --app agents.synthetic:make``) and as Flower clients.

The runner calls the factory with the agent id only, so the model's size comes from the
environment: ``FL_SYNTHETIC_PARAMS`` (d, default 1,000,000) split into ``FL_SYNTHETIC_LAYERS``
float32 layers (default 1).
"""

from __future__ import annotations

import functools
import os
import zlib

import numpy as np
from numpy.typing import NDArray

from agents.app import Config, Metrics, Parameters

PARAMS_ENV = "FL_SYNTHETIC_PARAMS"
LAYERS_ENV = "FL_SYNTHETIC_LAYERS"
DEFAULT_PARAMS = 1_000_000
DEFAULT_LAYERS = 1
STEP_SCALE = 1e-3
"""Largest step an agent adds to each coordinate in one round: small against the initial values."""


def layer_sizes(params: int, layers: int) -> list[int]:
    """``params`` split into ``layers`` nearly equal parts, the larger ones first."""
    if params < 1 or not 1 <= layers <= params:
        raise ValueError(f"a synthetic model needs params >= 1 and 1 <= layers <= params; "
                         f"got params={params}, layers={layers}")
    return [params // layers + (1 if i < params % layers else 0) for i in range(layers)]


@functools.lru_cache(maxsize=4)
def initial_model(params: int, layers: int) -> dict[str, NDArray[np.float32]]:
    """Version 0: layers ``layer_000``, ... of N(0, 0.01^2) values, seeded; one copy per process,
    shared by every agent in it (the runtime only reads a trainer's parameters)."""
    rng = np.random.default_rng(0)
    return {f"layer_{i:03d}": (rng.standard_normal(size, dtype=np.float32) * np.float32(0.01))
            for i, size in enumerate(layer_sizes(params, layers))}


def step(agent_id: str, server_round: int) -> np.float32:
    """The agent's step in a round: in [-STEP_SCALE/2, STEP_SCALE/2), from CRC-32 of the id and round."""
    return np.float32((zlib.crc32(f"{agent_id}/{server_round}".encode()) % 1000 / 1000 - 0.5) * STEP_SCALE)


class SyntheticTrainer:
    """An ``agents.app.Trainer`` whose fit adds :func:`step` to the received layers."""

    num_examples = 1

    def __init__(self, agent_id: str, params: int = DEFAULT_PARAMS, layers: int = DEFAULT_LAYERS) -> None:
        self.agent_id = agent_id
        self.params = initial_model(params, layers)

    def get_parameters(self, config: Config) -> Parameters:
        return self.params

    def fit(self, parameters: Parameters, config: Config) -> tuple[Parameters, int, Metrics]:
        delta = step(self.agent_id, int(config.get("server_round", 0)))
        return {name: np.asarray(layer) + delta for name, layer in parameters.items()}, self.num_examples, {}

    def evaluate(self, parameters: Parameters, config: Config) -> tuple[float, int, Metrics]:
        return 0.0, self.num_examples, {}


def make(agent_id: str) -> SyntheticTrainer:
    """The runner's factory: the model sized by ``FL_SYNTHETIC_PARAMS`` and ``FL_SYNTHETIC_LAYERS``."""
    return SyntheticTrainer(agent_id, int(os.environ.get(PARAMS_ENV, DEFAULT_PARAMS)),
                            int(os.environ.get(LAYERS_ENV, DEFAULT_LAYERS)))
