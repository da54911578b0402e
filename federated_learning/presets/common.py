"""Shared pieces of the built-in trainers: records, layer specs, validation, minibatch SGD.

Local training is plain minibatch SGD on the mean cross-entropy, with two optional
penalties added to the gradient:

- L2 weight decay on the weight matrices (layers whose name ends in ``.weight``):
  ``lambda * w`` (the gradient of ``(lambda/2) * ||w||^2``);
- the FedProx proximal term ``(mu/2) * ||w - w_global||^2`` on every layer, whose
  gradient is ``mu * (w - w_global)`` (Li et al., "Federated Optimization in
  Heterogeneous Networks", 2020, arXiv:1812.06127, eq. 2).

Weights travel as float32; all arithmetic inside a training call is float64.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Weights = dict[str, NDArray[np.float32]]
Params = dict[str, NDArray[np.float64]]
Labels = NDArray[np.int64]

WEIGHT_DTYPE = "float32"


class WeightsMismatch(ValueError):
    """Weights do not match a trainer's layer specs (names, order, shapes, dtypes, finiteness)."""


@dataclass(frozen=True)
class LayerSpec:
    """Name, shape and dtype of one layer tensor, as uploaded and stored."""

    name: str
    shape: tuple[int, ...]
    dtype: str = WEIGHT_DTYPE


@dataclass(frozen=True)
class TrainResult:
    """Outcome of local training.

    ``loss`` (mean cross-entropy, no penalties) and ``accuracy`` are measured on the
    local training data with the weights after training; ``steps`` counts SGD updates.
    """

    num_examples: int
    loss: float
    accuracy: float
    steps: int


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy and accuracy of a model on a labelled data set."""

    loss: float
    accuracy: float
    num_examples: int


@dataclass(frozen=True)
class SGDConfig:
    """Hyper-parameters of one local training call, validated on construction."""

    epochs: int
    batch_size: int
    learning_rate: float
    proximal_mu: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be finite and > 0; got {self.learning_rate}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be finite and >= 0; got {self.proximal_mu}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0; got {self.weight_decay}")


def log_softmax(logits: NDArray[np.float64]) -> NDArray[np.float64]:
    """Row-wise ``z - logsumexp(z)``, shifted by the row max so exp never overflows.

    Shape (N, C) in and out, float64.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    out: NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


def cross_entropy(logits: NDArray[np.float64], y: Labels) -> float:
    """Mean cross-entropy ``-(1/N) sum_i log softmax(z_i)[y_i]``; logits (N, C), y (N,) int."""
    return float(-log_softmax(logits)[np.arange(logits.shape[0]), y].mean())


def cross_entropy_and_grad(
    logits: NDArray[np.float64], y: Labels
) -> tuple[float, NDArray[np.float64]]:
    """Mean cross-entropy and its gradient in z, ``(softmax(z) - onehot(y)) / N``.

    logits (N, C) float64, y (N,) int; the gradient has the shape of logits.
    """
    n = logits.shape[0]
    logp = log_softmax(logits)
    rows = np.arange(n)
    loss = float(-logp[rows, y].mean())
    grad = np.exp(logp)
    grad[rows, y] -= 1.0
    grad /= n
    return loss, grad


def check_dataset(
    x: NDArray[np.floating], y: NDArray[np.integer], num_features: int, num_classes: int
) -> None:
    """Refuse inputs a trainer cannot use: wrong rank or width, non-finite features, bad labels."""
    if x.ndim != 2 or x.shape[1] != num_features:
        raise ValueError(f"x must have shape (N, {num_features}); got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("x holds no examples")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},); got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels; got dtype {y.dtype}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must hold floating-point features; got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or Inf")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}); got range [{y.min()}, {y.max()}]")


def check_weights(weights: Mapping[str, NDArray[np.generic]], specs: tuple[LayerSpec, ...]) -> None:
    """Raise WeightsMismatch unless ``weights`` has exactly the layers of ``specs``, in order,
    with their shapes and dtypes, and only finite values."""
    names = list(weights)
    expected = [s.name for s in specs]
    if names != expected:
        raise WeightsMismatch(f"layers must be {expected} in this order; got {names}")
    for spec in specs:
        array = weights[spec.name]
        if array.shape != spec.shape:
            raise WeightsMismatch(
                f"layer '{spec.name}' must have shape {spec.shape}; got {array.shape}"
            )
        if array.dtype != np.dtype(spec.dtype):
            raise WeightsMismatch(f"layer '{spec.name}' must be {spec.dtype}; got {array.dtype}")
        if not np.all(np.isfinite(array)):
            raise WeightsMismatch(f"layer '{spec.name}' contains NaN or Inf")


def to_params(weights: Mapping[str, NDArray[np.float32]]) -> Params:
    """Copy float32 weights into fresh float64 arrays for training."""
    return {name: np.array(w, dtype=np.float64) for name, w in weights.items()}


def to_weights(params: Mapping[str, NDArray[np.float64]]) -> Weights:
    """Cast float64 parameters back to float32 weights, keeping layer order."""
    return {name: p.astype(np.float32) for name, p in params.items()}


def minibatches(
    num_examples: int, batch_size: int, rng: np.random.Generator
) -> Iterator[NDArray[np.intp]]:
    """Yield the index arrays of one epoch: a fresh permutation cut into batches.

    The last batch holds the remainder (it is smaller, never dropped).
    """
    order = rng.permutation(num_examples)
    for start in range(0, num_examples, batch_size):
        yield order[start : start + batch_size]


def sgd_step(params: Params, grads: Params, anchor: Params, config: SGDConfig) -> None:
    """In place: ``w <- w - lr * (g + lambda * w [weights only] + mu * (w - w_global))``."""
    for name, p in params.items():
        step = grads[name]
        if config.weight_decay > 0 and name.endswith(".weight"):
            step = step + config.weight_decay * p
        if config.proximal_mu > 0:
            step = step + config.proximal_mu * (p - anchor[name])
        p -= config.learning_rate * step


class GradientTrainer(ABC):
    """A differentiable classifier trained by minibatch SGD; subclasses give the model.

    Subclasses provide ``layer_specs``, ``init_model``, ``logits`` and ``loss_and_grad``;
    this class validates inputs and runs training and evaluation.
    """

    def __init__(self, *, num_features: int, num_classes: int, weight_decay: float = 0.0) -> None:
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1; got {num_features}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {num_classes}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0; got {weight_decay}")
        self.num_features = num_features
        self.num_classes = num_classes
        self.weight_decay = weight_decay

    @abstractmethod
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """Names, shapes and dtypes of the model's layers, in their fixed order."""

    @abstractmethod
    def init_model(self, seed: int) -> Weights:
        """Fresh float32 weights, deterministic in ``seed``."""

    @abstractmethod
    def logits(self, params: Params, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """Class scores, shape (N, C) float64, for features x of shape (N, F)."""

    @abstractmethod
    def loss_and_grad(
        self, params: Params, x: NDArray[np.float64], y: Labels
    ) -> tuple[float, Params]:
        """Mean cross-entropy on (x, y) and its gradient for every layer (float64)."""

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
        """Run local SGD from ``weights`` (also the FedProx anchor); return new weights and metrics.

        Deterministic in ``seed`` (it drives only the batch order). x (N, F) float, y (N,) int.
        """
        config = SGDConfig(epochs, batch_size, learning_rate, proximal_mu, self.weight_decay)
        check_weights(weights, self.layer_specs())
        check_dataset(x, y, self.num_features, self.num_classes)
        x64 = np.asarray(x, dtype=np.float64)
        labels = np.asarray(y, dtype=np.int64)
        anchor = to_params(weights)
        params = to_params(weights)
        rng = np.random.default_rng(seed)
        steps = 0
        for _ in range(config.epochs):
            for batch in minibatches(len(labels), config.batch_size, rng):
                _, grads = self.loss_and_grad(params, x64[batch], labels[batch])
                sgd_step(params, grads, anchor, config)
                steps += 1
        new_weights = to_weights(params)
        metrics = self._evaluate_params(to_params(new_weights), x64, labels)
        return new_weights, TrainResult(metrics.num_examples, metrics.loss, metrics.accuracy, steps)

    def evaluate(
        self,
        weights: Mapping[str, NDArray[np.float32]],
        x: NDArray[np.floating],
        y: NDArray[np.integer],
    ) -> EvalResult:
        """Mean cross-entropy and accuracy of ``weights`` on (x, y)."""
        check_weights(weights, self.layer_specs())
        check_dataset(x, y, self.num_features, self.num_classes)
        return self._evaluate_params(
            to_params(weights), np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)
        )

    def _evaluate_params(self, params: Params, x: NDArray[np.float64], y: Labels) -> EvalResult:
        logits = self.logits(params, x)
        loss = cross_entropy(logits, y)
        accuracy = float(np.mean(logits.argmax(axis=1) == y))
        return EvalResult(loss=loss, accuracy=accuracy, num_examples=len(y))
