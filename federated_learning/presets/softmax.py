"""Multinomial softmax (logistic) regression trained by minibatch SGD.

Model: ``p(y | x) = softmax(x @ W + b)`` with W of shape (F, C) and b of shape (C,),
stored as the layers ``dense.weight`` and ``dense.bias`` (float32). Loss: mean
cross-entropy; optional L2 weight decay on W and the FedProx proximal term
(Li et al., 2020, arXiv:1812.06127) are handled by ``GradientTrainer``.
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

INIT_STD = 0.01


def softmax_logits(params: Params, x: NDArray[np.float64]) -> NDArray[np.float64]:
    """``x @ W + b``: x (N, F), W (F, C), b (C,) -> (N, C), float64."""
    out: NDArray[np.float64] = x @ params["dense.weight"] + params["dense.bias"]
    return out


def softmax_loss_and_grad(
    params: Params, x: NDArray[np.float64], y: Labels
) -> tuple[float, Params]:
    """Mean cross-entropy L and its gradients ``dL/dW = x^T G``, ``dL/db = sum_i G_i``.

    G = (softmax(xW + b) - onehot(y)) / N, shape (N, C); gradients have the layers' shapes.
    """
    loss, g = cross_entropy_and_grad(softmax_logits(params, x), y)
    return loss, {"dense.weight": x.T @ g, "dense.bias": g.sum(axis=0)}


class SoftmaxTrainer(GradientTrainer):
    """Softmax regression over ``num_features`` inputs and ``num_classes`` classes."""

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """``dense.weight`` (F, C) then ``dense.bias`` (C,), both float32."""
        return (
            LayerSpec("dense.weight", (self.num_features, self.num_classes)),
            LayerSpec("dense.bias", (self.num_classes,)),
        )

    def init_model(self, seed: int) -> Weights:
        """W ~ N(0, INIT_STD^2) drawn from ``seed``, b = 0."""
        rng = np.random.default_rng(seed)
        weight = rng.normal(0.0, INIT_STD, size=(self.num_features, self.num_classes))
        return {
            "dense.weight": weight.astype(np.float32),
            "dense.bias": np.zeros(self.num_classes, dtype=np.float32),
        }

    def logits(self, params: Params, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """Class scores ``x @ W + b``, shape (N, C)."""
        return softmax_logits(params, x)

    def loss_and_grad(
        self, params: Params, x: NDArray[np.float64], y: Labels
    ) -> tuple[float, Params]:
        """Mean cross-entropy and its gradients, see ``softmax_loss_and_grad``."""
        return softmax_loss_and_grad(params, x, y)
