"""Built-in local trainers of the agents: softmax regression and a one-hidden-layer MLP."""

from agents.trainers.base import (
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
