"""One-hidden-layer perceptron (ReLU) trained by minibatch SGD.

Model: ``h = relu(x @ W1 + b1)``, ``z = h @ W2 + b2``, ``p(y | x) = softmax(z)``, with
layers ``hidden.weight`` (F, H), ``hidden.bias`` (H,), ``output.weight`` (H, C),
``output.bias`` (C,), float32. Weights use He initialisation (He et al., "Delving Deep
into Rectifiers", 2015, arXiv:1502.01852): ``N(0, 2 / fan_in)``, biases zero.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from federated_learning.presets.common import (
    GradientTrainer,
    Labels,
    LayerSpec,
    Params,
    Weights,
    cross_entropy_and_grad,
)


def mlp_hidden(
    params: Params, x: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Pre-activation ``a = x @ W1 + b1`` and activation ``relu(a)``, both (N, H) float64."""
    pre: NDArray[np.float64] = x @ params["hidden.weight"] + params["hidden.bias"]
    return pre, np.maximum(pre, 0.0)


def mlp_logits(params: Params, x: NDArray[np.float64]) -> NDArray[np.float64]:
    """``relu(x @ W1 + b1) @ W2 + b2``: x (N, F) -> (N, C), float64."""
    _, h = mlp_hidden(params, x)
    out: NDArray[np.float64] = h @ params["output.weight"] + params["output.bias"]
    return out


def mlp_loss_and_grad(params: Params, x: NDArray[np.float64], y: Labels) -> tuple[float, Params]:
    """Mean cross-entropy and its gradients by backpropagation.

    With G = (softmax(z) - onehot(y)) / N: dW2 = h^T G, db2 = sum G,
    D = (G W2^T) * [a > 0], dW1 = x^T D, db1 = sum D. Shapes follow the layers.
    """
    pre, h = mlp_hidden(params, x)
    logits = h @ params["output.weight"] + params["output.bias"]
    loss, g = cross_entropy_and_grad(logits, y)
    d_pre = (g @ params["output.weight"].T) * (pre > 0)
    return loss, {
        "hidden.weight": x.T @ d_pre,
        "hidden.bias": d_pre.sum(axis=0),
        "output.weight": h.T @ g,
        "output.bias": g.sum(axis=0),
    }


class MLPTrainer(GradientTrainer):
    """ReLU MLP: ``num_features`` inputs, ``hidden`` units, ``num_classes`` outputs."""

    def __init__(
        self, *, num_features: int, num_classes: int, hidden: int = 64, weight_decay: float = 0.0
    ) -> None:
        super().__init__(
            num_features=num_features, num_classes=num_classes, weight_decay=weight_decay
        )
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1; got {hidden}")
        self.hidden = hidden

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """hidden.weight (F, H), hidden.bias (H,), output.weight (H, C), output.bias (C,)."""
        return (
            LayerSpec("hidden.weight", (self.num_features, self.hidden)),
            LayerSpec("hidden.bias", (self.hidden,)),
            LayerSpec("output.weight", (self.hidden, self.num_classes)),
            LayerSpec("output.bias", (self.num_classes,)),
        )

    def init_model(self, seed: int) -> Weights:
        """He-normal weights ``N(0, 2 / fan_in)`` drawn from ``seed``; zero biases."""
        rng = np.random.default_rng(seed)
        f, h, c = self.num_features, self.hidden, self.num_classes
        return {
            "hidden.weight": rng.normal(0.0, np.sqrt(2.0 / f), size=(f, h)).astype(np.float32),
            "hidden.bias": np.zeros(h, dtype=np.float32),
            "output.weight": rng.normal(0.0, np.sqrt(2.0 / h), size=(h, c)).astype(np.float32),
            "output.bias": np.zeros(c, dtype=np.float32),
        }

    def logits(self, params: Params, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """Class scores, shape (N, C)."""
        return mlp_logits(params, x)

    def loss_and_grad(
        self, params: Params, x: NDArray[np.float64], y: Labels
    ) -> tuple[float, Params]:
        """Mean cross-entropy and its gradients, see ``mlp_loss_and_grad``."""
        return mlp_loss_and_grad(params, x, y)
