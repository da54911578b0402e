"""One task's local work with the user's trainer: evaluate the received model, then train it.

Pure of I/O: the agent runtime calls :func:`run_trainer` in a worker thread and does the
uploading. The trainer's figures are checked here, so a trainer that returns another layout,
a negative example count or a NaN loss fails its task with a reason instead of sending junk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from agents.app import Config, Parameters, Scalar, Trainer, layout_of
from federated_learning.protocol.messages import Evaluation, Task, TaskKind
from federated_learning.protocol.tensors import InvalidTensor, layout_mismatch


@dataclass(frozen=True)
class LocalResult:
    """What local training produced: the new model and its training metrics."""

    layers: dict[str, NDArray[np.floating]]
    num_examples: int
    loss: float
    accuracy: float


def task_config(task: Task) -> Config:
    """The ``config`` a trainer gets: the round and the training's local settings."""
    return {"server_round": task.round, "local_epochs": task.settings.epochs,
            "batch_size": task.settings.batch_size, "learning_rate": task.settings.learning_rate,
            "proximal_mu": task.settings.proximal_mu, "training_id": task.training_id}


def _figure(metrics: Mapping[str, Scalar], key: str, default: float, low: float, high: float) -> float:
    value = metrics.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    number = float(value)
    return min(max(number, low), high) if math.isfinite(number) else default


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise ValueError(f"the trainer's {what} returned {value!r} examples; expected an int >= 0")
    return int(value)


def run_trainer(trainer: Trainer, task: Task, weights: Parameters) -> tuple[Evaluation, LocalResult | None]:
    """Evaluate ``weights`` with the user's trainer; for train tasks, fit and check the result's layout."""
    config = task_config(task)
    loss, evaluated, metrics = trainer.evaluate(weights, dict(config))
    if not math.isfinite(float(loss)):
        raise ValueError(f"the trainer's evaluate returned loss {loss}; expected a finite number")
    evaluation = Evaluation(loss=max(0.0, float(loss)), accuracy=_figure(metrics, "accuracy", 0.0, 0.0, 1.0),
                            num_examples=_count(evaluated, "evaluate"))
    if task.kind is TaskKind.EVALUATE:
        return evaluation, None
    new, trained, fit_metrics = trainer.fit(weights, dict(config))
    layers = {name: np.asarray(layer) for name, layer in new.items()}
    if set(layers) == set(weights):  # the trainer's own order: back to the training's
        layers = {name: layers[name] for name in weights}
    problem = layout_mismatch(layout_of(layers), layout_of(weights))
    if problem is not None:
        raise InvalidTensor(problem.reason, f"the trainer's fit returned another layout: {problem.detail}")
    count = _count(trained, "fit")
    if count == 0:
        raise ValueError("the trainer's fit trained on 0 examples")
    return evaluation, LocalResult(layers, count, _figure(fit_metrics, "loss", float(loss), 0.0, math.inf),
                                   _figure(fit_metrics, "accuracy", 0.0, 0.0, 1.0))
