"""A Flower ``NumPyClient`` on the digits data, as a Flower user would write it (needs ``flwr``).

It subclasses ``flwr.client.NumPyClient`` and knows nothing of this system: ``agents.flower.FlowerAgent``
runs it unchanged. Importing this module fails with ImportError where Flower is not installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.client import NumPyClient
from numpy.typing import NDArray

from federated_learning.presets import create_trainer

NUM_FEATURES = 64
NUM_CLASSES = 10
LAYERS = ("dense.weight", "dense.bias")


class DigitsNumPyClient(NumPyClient):
    """Softmax regression over local digits: ``get_parameters``, ``fit`` and ``evaluate`` on NumPy arrays."""

    def __init__(self, x: NDArray[np.float32], y: NDArray[np.int64],
                 x_eval: NDArray[np.float32], y_eval: NDArray[np.int64]) -> None:
        self.trainer = create_trainer("softmax", num_features=NUM_FEATURES, num_classes=NUM_CLASSES)
        self.parameters: list[NDArray[Any]] = list(self.trainer.init_model(0).values())
        self.x, self.y, self.x_eval, self.y_eval = x, y, x_eval, y_eval
        self.fits = 0

    def get_parameters(self, config: dict[str, Any]) -> list[NDArray[Any]]:
        return self.parameters

    def fit(self, parameters: list[NDArray[Any]], config: dict[str, Any]
            ) -> tuple[list[NDArray[Any]], int, dict[str, Any]]:
        weights, result = self.trainer.train(
            dict(zip(LAYERS, parameters, strict=True)), self.x, self.y,
            epochs=int(config["local_epochs"]), batch_size=int(config["batch_size"]),
            learning_rate=float(config["learning_rate"]), proximal_mu=float(config["proximal_mu"]),
            seed=int(config["server_round"]))
        self.parameters = [np.asarray(weights[name], dtype=np.float32) for name in LAYERS]
        self.fits += 1
        return self.parameters, len(self.y), {"loss": float(result.loss), "accuracy": float(result.accuracy)}

    def evaluate(self, parameters: list[NDArray[Any]], config: dict[str, Any]
                 ) -> tuple[float, int, dict[str, Any]]:
        result = self.trainer.evaluate(dict(zip(LAYERS, parameters, strict=True)), self.x_eval, self.y_eval)
        return float(result.loss), int(result.num_examples), {"accuracy": float(result.accuracy)}
