"""Run an existing Flower ``NumPyClient`` as an agent of this system, without changing it.

The adapter calls the client's own methods, as Flower would: ``evaluate(parameters, config)``
on the model the agent received (its report of that version), then, for train tasks,
``fit(parameters, config) -> (parameters, num_examples, metrics)``. Parameters are the
model's layers in the training's order (``ModelSpec`` layer order). ``config`` carries
``server_round``, ``local_epochs``, ``batch_size``, ``learning_rate`` and ``proximal_mu``.
Clipping, local noise, compression and signing are done by the agent runtime as for any agent.
``flwr`` itself is not needed: any object with those methods works (duck typing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from agents.client import FederatedClient, LocalResult
from federated_learning.protocol.messages import Evaluation, Task, TaskKind
from federated_learning.protocol.tensors import InvalidTensor
from federated_learning.types import NamedLayers

Scalar = bool | bytes | float | int | str


class NumPyClientLike(Protocol):
    def get_parameters(self, config: dict[str, Scalar]) -> Sequence[NDArray[Any]]: ...

    def fit(self, parameters: list[NDArray[Any]], config: dict[str, Scalar]
            ) -> tuple[Sequence[NDArray[Any]], int, Mapping[str, Scalar]]: ...

    def evaluate(self, parameters: list[NDArray[Any]], config: dict[str, Scalar]
                 ) -> tuple[float, int, Mapping[str, Scalar]]: ...


class FlowerAgent(FederatedClient):
    """A ``FederatedClient`` whose local work is a Flower ``NumPyClient``."""

    def __init__(self, agent_id: str, numpy_client: NumPyClientLike, *, dataset: str,
                 num_examples: int, **kwargs: Any) -> None:
        super().__init__(agent_id, **kwargs)
        if num_examples <= 0:
            raise ValueError(f"num_examples must be > 0; got {num_examples}")
        self.numpy_client = numpy_client
        self.dataset = dataset
        self.num_examples = num_examples

    def dataset_sizes(self) -> dict[str, int]:
        return {self.dataset: self.num_examples}

    def check_model(self, task: Task, received: NamedLayers) -> None:
        own = self.numpy_client.get_parameters({})
        shapes = [tuple(np.shape(p)) for p in own]
        if shapes != [tuple(a.shape) for a in received.values()]:
            raise InvalidTensor("bad_shape", f"the Flower client's parameters have shapes {shapes}; "
                                             f"the training's model has {[a.shape for a in received.values()]}")

    def evaluate_and_train(self, task: Task, weights: dict[str, NDArray[np.floating]]
                           ) -> tuple[Evaluation, LocalResult | None]:
        parameters = [np.array(layer, copy=True) for layer in weights.values()]
        config: dict[str, Scalar] = {
            "server_round": task.round, "local_epochs": task.settings.epochs,
            "batch_size": task.settings.batch_size, "learning_rate": task.settings.learning_rate,
            "proximal_mu": task.settings.proximal_mu,
        }
        loss, evaluated, metrics = self.numpy_client.evaluate(parameters, config)
        evaluation = Evaluation(loss=float(loss), accuracy=float(metrics.get("accuracy", 0.0)),
                                num_examples=int(evaluated))
        if task.kind is TaskKind.EVALUATE:
            return evaluation, None
        new_parameters, trained, fit_metrics = self.numpy_client.fit(parameters, config)
        layers = dict(zip(weights, (np.asarray(p) for p in new_parameters), strict=True))
        return evaluation, LocalResult(layers, int(trained), float(fit_metrics.get("loss", loss)),
                                       float(fit_metrics.get("accuracy", 0.0)))
