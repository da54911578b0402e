"""The contract between the agent runtime and the user's own model: the ``Trainer`` protocol.

A trainer is as small as Flower's ``NumPyClient``, over *named* arrays (the layout of a
safetensors file): ``get_parameters`` gives the model's layers in their fixed order, ``fit``
trains from the global model and returns the new layers, ``evaluate`` scores the global model
on local held-out data. The runtime does everything else (join, heartbeat, signing, clipping,
noise, compression, secure aggregation), so a trainer never sees asyncio or Redis.

Layers may be float16, bfloat16 (``ml_dtypes.bfloat16``), float32 or float64; integer layers
(e.g. PyTorch BatchNorm's ``num_batches_tracked``) are carried as the docs describe
(docs/your-own-model.md). ``fit`` must return the same names, shapes and dtypes it received.

``config`` holds ``server_round``, ``local_epochs``, ``batch_size``, ``learning_rate``,
``proximal_mu`` and ``training_id``: the training's local settings, to use or ignore.

A memory-bank training asks for features instead of weights: see :class:`MemoryBankTrainer`.

Ready adapters: :mod:`agents.adapters.torch` (an ``nn.Module`` with the user's train and
evaluate functions), :mod:`agents.adapters.sklearn` (linear models, ``MLPClassifier``), and
:class:`FlowerTrainer` here (an unchanged Flower ``NumPyClient``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np
from numpy.typing import NDArray

Scalar: TypeAlias = bool | bytes | float | int | str
Config: TypeAlias = dict[str, Scalar]
Metrics: TypeAlias = Mapping[str, Scalar]
Parameters: TypeAlias = Mapping[str, NDArray[Any]]
"""A model as named arrays, in the model's fixed order."""


@runtime_checkable
class Trainer(Protocol):
    """The user's model, as the agent runtime drives it."""

    def get_parameters(self, config: Config) -> Parameters:
        """The model's current layers, by name, in their fixed order."""
        ...

    def fit(self, parameters: Parameters, config: Config) -> tuple[Parameters, int, Metrics]:
        """Train from ``parameters``: (new layers, number of training examples, metrics).

        Metrics may hold ``loss`` and ``accuracy`` (training figures), reported to the operator."""
        ...

    def evaluate(self, parameters: Parameters, config: Config) -> tuple[float, int, Metrics]:
        """Score ``parameters`` on local held-out data: (loss, number of examples, metrics with
        ``accuracy`` in [0, 1] where the model has one)."""
        ...


@runtime_checkable
class MemoryBankTrainer(Protocol):
    """An agent of a memory-bank training (federated PatchCore): a frozen feature extractor over
    the agent's local data. The runtime keeps a greedy k-center coreset of the rows
    (``local_coreset_fraction`` of them, at most ``max_rows_per_agent``) and uploads only that.

    ``config`` holds ``server_round``, ``training_id``, ``feature_dim``,
    ``local_coreset_fraction`` and ``max_rows_per_agent``."""

    def extract_features(self, config: Config) -> tuple[NDArray[np.floating[Any]], int]:
        """Features of this agent's local (normal) data, one row per patch (``rows x feature_dim``,
        float), and the number of examples (e.g. images) they come from."""
        ...


class NumPyClientLike(Protocol):
    """Flower's ``NumPyClient`` (duck-typed: ``flwr`` itself is not needed)."""

    def get_parameters(self, config: dict[str, Scalar]) -> Sequence[NDArray[Any]]: ...

    def fit(self, parameters: list[NDArray[Any]], config: dict[str, Scalar]
            ) -> tuple[Sequence[NDArray[Any]], int, Mapping[str, Scalar]]: ...

    def evaluate(self, parameters: list[NDArray[Any]], config: dict[str, Scalar]
                 ) -> tuple[float, int, Mapping[str, Scalar]]: ...


def flower_layer_names(count: int) -> list[str]:
    """Names for a Flower client's unnamed parameters: ``param_000``, ``param_001``, ... (their
    order is their position, and the names sort the same way)."""
    return [f"param_{i:03d}" for i in range(count)]


class FlowerTrainer:
    """An unchanged Flower ``NumPyClient`` as a :class:`Trainer`.

    Flower's parameters are a list; their names are the training's layer names in order when
    the training's model names them (an uploaded model), else ``param_000``, ``param_001``, ...
    """

    def __init__(self, client: NumPyClientLike) -> None:
        self.client = client
        self.num_examples: int | None = getattr(client, "num_examples", None)
        """What the agent announces when it joins, when the client says (Flower's clients often do)."""

    def get_parameters(self, config: Config) -> Parameters:
        arrays = [np.asarray(p) for p in self.client.get_parameters(config)]
        return dict(zip(flower_layer_names(len(arrays)), arrays, strict=True))

    def fit(self, parameters: Parameters, config: Config) -> tuple[Parameters, int, Metrics]:
        names = list(parameters)
        new, num_examples, metrics = self.client.fit([np.array(a, copy=True) for a in parameters.values()],
                                                     config)
        new_list = [np.asarray(p) for p in new]
        if len(new_list) != len(names):
            raise ValueError(f"the Flower client's fit returned {len(new_list)} arrays; the model has "
                             f"{len(names)} layers")
        return dict(zip(names, new_list, strict=True)), int(num_examples), dict(metrics)

    def evaluate(self, parameters: Parameters, config: Config) -> tuple[float, int, Metrics]:
        loss, num_examples, metrics = self.client.evaluate(
            [np.array(a, copy=True) for a in parameters.values()], config)
        return float(loss), int(num_examples), dict(metrics)

    def matches_by_position(self) -> bool:
        """Flower clients are matched to a model's layers by position, not by name."""
        return True


def as_trainer(app: object) -> Trainer:
    """What a factory returned, as a :class:`Trainer`: a trainer itself, or a Flower
    ``NumPyClient`` (its ``get_parameters`` returns a list), wrapped in :class:`FlowerTrainer`."""
    for method in ("get_parameters", "fit", "evaluate"):
        if not callable(getattr(app, method, None)):
            raise TypeError(f"{type(app).__name__} is not a trainer: it has no {method}() method "
                            "(see agents.app.Trainer)")
    if isinstance(app, FlowerTrainer):
        return app
    parameters = app.get_parameters({})  # type: ignore[attr-defined]
    if isinstance(parameters, Mapping):
        return app  # type: ignore[return-value]
    if isinstance(parameters, Sequence):
        return FlowerTrainer(app)  # type: ignore[arg-type]
    raise TypeError(f"{type(app).__name__}.get_parameters() returned {type(parameters).__name__}; "
                    "expected a mapping of name -> array (or a list, for a Flower NumPyClient)")


def layout_of(parameters: Parameters) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtype names of a model's layers, in order."""
    return {name: (tuple(int(n) for n in np.shape(a)), np.asarray(a).dtype.name)
            for name, a in parameters.items()}
