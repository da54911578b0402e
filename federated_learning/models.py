"""The built-in models a training can name (``ModelSpec``), backed by the agents' trainers."""

from __future__ import annotations

from agents.trainers import trainer_for
from federated_learning.protocol.messages import ModelSpec
from federated_learning.types import NamedLayers


def initial_model(spec: ModelSpec) -> NamedLayers:
    """Fresh weights of ``spec``'s model, deterministic in ``spec.seed``."""
    return dict(trainer_for(spec).init_model(spec.seed))
