"""The built-in preset models a training can name (``PresetModel``), backed by ``presets``."""

from __future__ import annotations

from federated_learning.presets import trainer_for
from federated_learning.protocol.messages import PresetModel
from federated_learning.types import NamedLayers


def initial_model(spec: PresetModel) -> NamedLayers:
    """Fresh weights of ``spec``'s model, deterministic in ``spec.seed``."""
    return dict(trainer_for(spec).init_model(spec.seed))
