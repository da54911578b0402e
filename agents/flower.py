"""Run an existing Flower ``NumPyClient`` as an agent of this system, without changing it.

The runtime calls the client's own methods, as Flower would: ``evaluate(parameters, config)``
on the model the agent received (its report of that version), then, for train tasks,
``fit(parameters, config) -> (parameters, num_examples, metrics)``. Parameters are the
model's layers in the training's order, matched by position; their dtypes are the client's
own (float64 for a scikit-learn model, for instance). ``config`` carries ``server_round``,
``local_epochs``, ``batch_size``, ``learning_rate``, ``proximal_mu`` and ``training_id``.
Clipping, local noise, compression and signing are done by the agent runtime as for any agent.
``flwr`` itself is not needed: any object with those methods works (duck typing).
"""

from __future__ import annotations

from typing import Any

from agents.app import FlowerTrainer, NumPyClientLike
from agents.client import FederatedClient

__all__ = ["FlowerAgent", "NumPyClientLike"]


class FlowerAgent(FederatedClient):
    """A ``FederatedClient`` whose local work is a Flower ``NumPyClient``."""

    def __init__(self, agent_id: str, numpy_client: NumPyClientLike, *, dataset: str,
                 num_examples: int, **kwargs: Any) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be > 0; got {num_examples}")
        super().__init__(agent_id, trainer=FlowerTrainer(numpy_client), dataset=dataset,
                         num_examples=num_examples, **kwargs)
        self.numpy_client = numpy_client
