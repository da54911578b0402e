"""The trainer contract shared by agents and the server, and the factory of built-in trainers.

A trainer owns a model's layout (named float32 layers in a fixed order), its
initialisation, local training and evaluation. The server uses ``model_layer_specs``
and ``check_weights`` to validate uploaded updates without training anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from federated_learning.presets.common import (
    EvalResult,
    LayerSpec,
    TrainResult,
    Weights,
    WeightsMismatch,
    check_weights,
)
from federated_learning.presets.mlp import MLPTrainer
from federated_learning.presets.softmax import SoftmaxTrainer
from federated_learning.protocol.messages import PresetModel

__all__ = [
    "TRAINER_NAMES",
    "EvalResult",
    "LayerSpec",
    "TrainResult",
    "Trainer",
    "Weights",
    "WeightsMismatch",
    "check_weights",
    "create_trainer",
    "model_layer_specs",
    "trainer_for",
]

TRAINER_PARAMS: dict[str, frozenset[str]] = {
    "softmax": frozenset({"weight_decay"}),
    "mlp": frozenset({"hidden", "weight_decay"}),
}
TRAINER_NAMES: tuple[str, ...] = tuple(TRAINER_PARAMS)


class Trainer(Protocol):
    """What an agent needs from a model: layout, initialisation, training, evaluation."""

    num_features: int
    num_classes: int

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """Names, shapes and dtypes of the layers, in their fixed order."""
        ...

    def init_model(self, seed: int) -> Weights:
        """Fresh float32 weights, deterministic in ``seed``."""
        ...

    def train(
        self,
        weights: Mapping[str, NDArray[np.float32]],
        x: NDArray[np.floating],
        y: NDArray[np.integer],
        *,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        proximal_mu: float = 0.0,
        seed: int,
    ) -> tuple[Weights, TrainResult]:
        """Train from ``weights`` on (x, y); return the new weights and training metrics."""
        ...

    def evaluate(
        self,
        weights: Mapping[str, NDArray[np.float32]],
        x: NDArray[np.floating],
        y: NDArray[np.integer],
    ) -> EvalResult:
        """Loss and accuracy of ``weights`` on (x, y)."""
        ...


def _int_param(params: Mapping[str, object], key: str, default: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(  # noqa: TRY004 - every trainer config error is a ValueError
            f"trainer parameter '{key}' must be an integer; got {value!r}"
        )
    return value


def _float_param(params: Mapping[str, object], key: str, default: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(  # noqa: TRY004 - every trainer config error is a ValueError
            f"trainer parameter '{key}' must be a number; got {value!r}"
        )
    return float(value)


def create_trainer(name: str, *, num_features: int, num_classes: int, **params: object) -> Trainer:
    """Build ``"softmax"`` (param weight_decay) or ``"mlp"`` (params hidden=64, weight_decay).

    Raises ValueError naming the unknown trainer, unknown parameter or bad value.
    """
    if name not in TRAINER_PARAMS:
        raise ValueError(f"unknown trainer '{name}'; expected one of {list(TRAINER_NAMES)}")
    unknown = sorted(set(params) - TRAINER_PARAMS[name])
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for trainer '{name}'; "
            f"allowed: {sorted(TRAINER_PARAMS[name])}"
        )
    weight_decay = _float_param(params, "weight_decay", 0.0)
    if name == "softmax":
        return SoftmaxTrainer(
            num_features=num_features, num_classes=num_classes, weight_decay=weight_decay
        )
    return MLPTrainer(
        num_features=num_features,
        num_classes=num_classes,
        hidden=_int_param(params, "hidden", 64),
        weight_decay=weight_decay,
    )


def model_layer_specs(
    name: str, *, num_features: int, num_classes: int, **params: object
) -> tuple[LayerSpec, ...]:
    """Layer names, shapes and dtypes of the model a trainer would build, in upload order."""
    return create_trainer(
        name, num_features=num_features, num_classes=num_classes, **params
    ).layer_specs()


def trainer_for(spec: PresetModel) -> Trainer:
    """The trainer of a built-in preset model (``PresetModel``)."""
    params: dict[str, object] = {"hidden": spec.hidden} if spec.trainer == "mlp" else {}
    return create_trainer(spec.trainer, num_features=spec.num_features,
                          num_classes=spec.num_classes, **params)
