"""One task's local work with the user's trainer: evaluate the received model, then train it.

Pure of I/O: the agent runtime calls :func:`run_trainer` in a worker thread and does the
uploading. The trainer's figures are checked here, so a trainer that returns another layout,
a negative example count or a NaN loss fails its task with a reason instead of sending junk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from agents.app import Config, MemoryBankTrainer, Parameters, Scalar, Trainer, layout_of
from federated_learning.protocol.messages import Evaluation, MemoryBankModel, Task, TaskKind
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


@dataclass(frozen=True)
class LocalBank:
    """What a memory-bank task produced: the local coreset to upload."""

    rows: NDArray[np.float32]
    num_examples: int
    extracted_bytes: int
    """Size of all the features the trainer extracted, as float32 (what a full upload would cost)."""
    seconds: float


def bank_config(task: Task, spec: MemoryBankModel) -> Config:
    """The ``config`` a feature extractor gets: the round and the bank's settings."""
    return {"server_round": task.round, "training_id": task.training_id, "feature_dim": spec.feature_dim,
            "local_coreset_fraction": spec.local_coreset_fraction, "max_rows_per_agent": spec.max_rows_per_agent}


def local_bank(trainer: MemoryBankTrainer, task: Task, spec: MemoryBankModel, *, seed: int) -> LocalBank:
    """Extract the agent's features and keep a greedy k-center coreset of them (the
    training's ``local_coreset_fraction``, at most ``max_rows_per_agent`` rows)."""
    from federated_learning.memory_bank import local_coreset

    started = time.perf_counter()
    features, examples = trainer.extract_features(bank_config(task, spec))
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != spec.feature_dim or features.shape[0] == 0:
        raise InvalidTensor("bad_shape", f"the trainer's extract_features returned shape {features.shape}; the "
                                         f"training's banks are rows x {spec.feature_dim} (at least one row)")
    if not np.issubdtype(features.dtype, np.floating):
        raise InvalidTensor("bad_dtype", f"the trainer's extract_features returned {features.dtype.name}; "
                                         "features are floats")
    features = np.ascontiguousarray(features, dtype=np.float32)
    if not np.isfinite(features).all():
        raise InvalidTensor("not_finite", "the trainer's extract_features returned NaN or Inf")
    count = _count(examples, "extract_features")
    if count == 0:
        raise ValueError("the trainer's extract_features came from 0 examples")
    rows = local_coreset(features, spec.local_coreset_fraction, spec.max_rows_per_agent, seed=seed)
    return LocalBank(rows=rows, num_examples=count, extracted_bytes=int(features.nbytes),
                     seconds=time.perf_counter() - started)
