"""The built-in preset models: softmax regression and a one-hidden-layer MLP, in NumPy.

Agents without a model of their own train them; the server builds their version 0 and
scores validation sets with them.
"""

from federated_learning.presets.base import (
    TRAINER_NAMES,
    EvalResult,
    LayerSpec,
    Trainer,
    TrainResult,
    Weights,
    WeightsMismatch,
    check_weights,
    create_trainer,
    model_layer_specs,
    trainer_for,
)

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
