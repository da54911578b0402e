"""The built-in models a training can name (``ModelSpec``), backed by the agents' trainers."""

from __future__ import annotations

from agents.trainers import Trainer, create_trainer
from federated_learning.protocol.messages import ModelSpec
from federated_learning.types import NamedLayers


def trainer_for(spec: ModelSpec) -> Trainer:
    """The trainer that builds, trains and evaluates ``spec``'s model."""
    params: dict[str, object] = {"hidden": spec.hidden} if spec.trainer == "mlp" else {}
    return create_trainer(spec.trainer, num_features=spec.num_features,
                          num_classes=spec.num_classes, **params)


def initial_model(spec: ModelSpec) -> NamedLayers:
    """Fresh weights of ``spec``'s model, deterministic in ``spec.seed``."""
    return dict(trainer_for(spec).init_model(spec.seed))
