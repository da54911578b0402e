"""Byzantine agents for robustness experiments: what a malicious agent uploads instead.

- ``sign_flip``: sends ``global - SCALE * (local - global)`` (the reversed, amplified step;
  Blanchard et al. 2017 / Fang et al. 2020 use such model-poisoning updates);
- ``gaussian``: sends ``global + N(0, GAUSSIAN_STD^2)`` noise instead of training;
- ``label_flip``: trains honestly on labels mapped ``y -> num_classes - 1 - y`` (data poisoning).
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

SIGN_FLIP_SCALE = 4.0
GAUSSIAN_STD = 1.0

Layers = dict[str, NDArray[np.float32]]


class Attack(StrEnum):
    SIGN_FLIP = "sign_flip"
    GAUSSIAN = "gaussian"
    LABEL_FLIP = "label_flip"


def poison_update(attack: Attack, global_layers: Layers, local: Layers, rng: np.random.Generator) -> Layers:
    """The model a malicious agent uploads after training ``local`` from ``global_layers``."""
    if attack is Attack.SIGN_FLIP:
        return {name: (global_layers[name] - SIGN_FLIP_SCALE * (local[name] - global_layers[name])).astype(np.float32)
                for name in local}
    if attack is Attack.GAUSSIAN:
        return {name: (global_layers[name] + rng.normal(0.0, GAUSSIAN_STD, size=local[name].shape)).astype(np.float32)
                for name in local}
    return local


def flip_labels(y: NDArray[np.integer], num_classes: int) -> NDArray[np.integer]:
    """Label-flipping poison: class c becomes num_classes - 1 - c."""
    return (num_classes - 1 - y).astype(y.dtype)
