"""Shared vocabulary of the aggregation rules: update slabs, input checks, the Strategy base.

A round's updates are held as one slab per layer: ``slabs[i]`` is a C-contiguous
``(K, d_i)`` array whose row ``k`` is layer ``i`` of client ``k`` flattened. Rules read
the slabs in place, so aggregation needs no ``K x d`` temporaries. The averaging rules
(``Strategy.reads_client_arrays``) also take the clients' own arrays as they are, so that
``Strategy.aggregate`` copies nothing into a slab for them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from federated_learning.numeric import all_finite

Layers = list[NDArray[np.floating]]
Slab = NDArray[np.floating]

def is_all_finite(values: NDArray[np.generic]) -> bool:
    """True when no entry of ``values`` (any shape) is NaN or Inf."""
    if values.size == 0 or not np.issubdtype(values.dtype, np.floating):
        return True
    return bool(all_finite(np.ascontiguousarray(values).reshape(-1)))


def slab_dtype(layer: NDArray[np.generic]) -> type[np.floating]:
    """float64 for float64 layers, float32 for everything else."""
    return np.float64 if layer.dtype == np.float64 else np.float32


def allocate_slabs(global_layers: Sequence[NDArray[np.generic]], num_clients: int) -> list[Slab]:
    """One uninitialised C-contiguous ``(num_clients, layer.size)`` slab per layer."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ValueError(f"num_clients must be an int; got {num_clients!r}")  # noqa: TRY004
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1; got {num_clients}")
    return [np.empty((int(num_clients), layer.size), slab_dtype(layer)) for layer in global_layers]


def fill_slabs(
    slabs: Sequence[Slab], client_layers: Sequence[Sequence[NDArray[np.generic]]]
) -> None:
    """Copy client ``k``'s layer ``i`` into row ``k`` of ``slabs[i]``."""
    for k, layers in enumerate(client_layers):
        for slab, layer in zip(slabs, layers, strict=True):
            np.copyto(slab[k], np.reshape(layer, -1), casting="same_kind")


def flat_client_arrays(
    global_layers: Sequence[NDArray[np.generic]],
    client_layers: Sequence[Sequence[NDArray[np.generic]]],
) -> list[list[NDArray[np.floating]]]:
    """Client ``k``'s layer ``i`` as a flat, aligned, C-contiguous array of the slab dtype of
    global layer ``i``: a view of the client's own array when it already is one, else a copy of
    that one array (same-kind casting, as ``fill_slabs``)."""
    dtypes = [np.dtype(slab_dtype(layer)) for layer in global_layers]
    return [
        [flat_client_array(layer, dtype) for layer, dtype in zip(layers, dtypes, strict=True)]
        for layers in client_layers
    ]


def flat_client_array(
    layer: NDArray[np.generic], dtype: np.dtype[np.floating]
) -> NDArray[np.floating]:
    """``layer`` flat, aligned, C-contiguous and of ``dtype``: a view when it already is so."""
    if layer.dtype == dtype and layer.flags.c_contiguous and layer.flags.aligned:
        return np.reshape(layer, -1).view(dtype)
    flat = np.reshape(layer, -1).astype(dtype, casting="same_kind", copy=False)
    return np.require(flat, requirements=("C", "A"))


def check_global_layers(
    global_layers: Sequence[NDArray[np.generic]], *, finite: bool = True
) -> None:
    """Reject an empty model, non-array layers and (when ``finite``) non-finite weights."""
    if len(global_layers) == 0:
        raise ValueError("global model has no layers")
    for i, layer in enumerate(global_layers):
        if not isinstance(layer, np.ndarray):
            kind = type(layer).__name__
            raise ValueError(f"global layer {i} is a {kind}, not a numpy array")  # noqa: TRY004
        if not (np.issubdtype(layer.dtype, np.number) or layer.dtype == np.bool_):
            raise ValueError(f"global layer {i} has non-numeric dtype {layer.dtype}")
        if finite and not is_all_finite(layer):
            raise ValueError(f"global layer {i} contains NaN or Inf")


def check_client_layers(
    global_layers: Sequence[NDArray[np.generic]],
    client_layers: Sequence[Sequence[NDArray[np.generic]]],
) -> None:
    """Every client sends one numeric array per global layer, of the same shape."""
    if len(client_layers) == 0:
        raise ValueError("no client updates to aggregate")
    for k, layers in enumerate(client_layers):
        if len(layers) != len(global_layers):
            raise ValueError(
                f"client {k} sent {len(layers)} layers; the global model has {len(global_layers)}"
            )
        for i, (layer, reference) in enumerate(zip(layers, global_layers, strict=True)):
            if not isinstance(layer, np.ndarray):
                kind = type(layer).__name__
                raise ValueError(f"client {k} layer {i} is a {kind}, not an array")  # noqa: TRY004
            if not (np.issubdtype(layer.dtype, np.number) or layer.dtype == np.bool_):
                raise ValueError(f"client {k} layer {i} has non-numeric dtype {layer.dtype}")
            if layer.shape != reference.shape:
                raise ValueError(
                    f"client {k} layer {i} has shape {layer.shape}; "
                    f"the global layer has shape {reference.shape}"
                )


def check_slabs(global_layers: Sequence[NDArray[np.generic]], slabs: Sequence[Slab]) -> int:
    """Check slab count, shapes, dtype and layout; return the number of clients K."""
    if len(slabs) != len(global_layers):
        raise ValueError(f"got {len(slabs)} slabs for a model of {len(global_layers)} layers")
    num_clients = -1
    for i, (slab, layer) in enumerate(zip(slabs, global_layers, strict=True)):
        if not isinstance(slab, np.ndarray) or slab.ndim != 2:
            raise ValueError(f"slab {i} must be a 2-D numpy array (clients x layer size)")
        if slab.dtype not in (np.float32, np.float64):
            raise ValueError(f"slab {i} has dtype {slab.dtype}; must be float32 or float64")
        if not slab.flags.c_contiguous:
            raise ValueError(f"slab {i} must be C-contiguous")
        if not slab.flags.aligned:
            raise ValueError(f"slab {i} must be aligned to its {slab.dtype} items")
        if slab.shape[1] != layer.size:
            raise ValueError(
                f"slab {i} holds rows of {slab.shape[1]} values; global layer {i} has {layer.size}"
            )
        if num_clients == -1:
            num_clients = slab.shape[0]
        elif slab.shape[0] != num_clients:
            raise ValueError(f"slab {i} has {slab.shape[0]} rows; slab 0 has {num_clients}")
    if num_clients < 1:
        raise ValueError("no client updates to aggregate")
    return num_clients


def check_num_examples(num_examples: Sequence[int], num_clients: int) -> NDArray[np.int64]:
    """Example counts: one positive int per client."""
    if len(num_examples) != num_clients:
        raise ValueError(f"got {len(num_examples)} example counts for {num_clients} updates")
    for k, n in enumerate(num_examples):
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"client {k} example count must be an int; got {n!r}")  # noqa: TRY004
        if n <= 0:
            raise ValueError(f"client {k} example count must be > 0; got {n}")
    return np.asarray([int(n) for n in num_examples], dtype=np.int64)


def check_staleness(staleness: Sequence[int] | None, num_clients: int) -> NDArray[np.int64]:
    """Staleness in model versions: one non-negative int per client; None means all fresh."""
    if staleness is None:
        return np.zeros(num_clients, dtype=np.int64)
    if len(staleness) != num_clients:
        raise ValueError(f"got {len(staleness)} staleness values for {num_clients} updates")
    for k, s in enumerate(staleness):
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"client {k} staleness must be an int; got {s!r}")  # noqa: TRY004
        if s < 0:
            raise ValueError(f"client {k} staleness must be >= 0; got {s}")
    return np.asarray([int(s) for s in staleness], dtype=np.int64)


def check_client_metrics(
    client_metrics: Sequence[Mapping[str, float]] | None, num_clients: int
) -> list[Mapping[str, float]] | None:
    """One metrics mapping per client, when given."""
    if client_metrics is None:
        return None
    if len(client_metrics) != num_clients:
        raise ValueError(f"got {len(client_metrics)} client metrics for {num_clients} updates")
    return list(client_metrics)


def example_weights(num_examples: NDArray[np.int64]) -> NDArray[np.float64]:
    """FedAvg weights ``n_k / sum(n)`` in float64; scaling every n_k by c changes nothing."""
    counts = num_examples.astype(np.float64)
    return np.asarray(counts / counts.sum(), dtype=np.float64)


@dataclass(frozen=True)
class UpdateBatch:
    """A validated round of updates, as the rules see it.

    The updates are either ``slabs`` (one ``(K, d_i)`` slab per layer) or, for rules that set
    ``Strategy.reads_client_arrays``, ``client_arrays`` (``client_arrays[k][i]`` is layer ``i``
    of client ``k``, flat, aligned and C-contiguous); the other list is empty.
    """

    global_layers: list[NDArray[np.generic]]
    slabs: list[Slab]
    num_examples: NDArray[np.int64]
    staleness: NDArray[np.int64]
    client_metrics: list[Mapping[str, float]] | None
    client_arrays: list[list[NDArray[np.floating]]] = field(default_factory=list)

    @property
    def num_clients(self) -> int:
        return int(self.num_examples.size)

    def layer_updates(self, layer: int) -> list[NDArray[np.floating]]:
        """Layer ``layer`` of every update, flat (views of slab rows or the clients' arrays)."""
        if self.slabs:
            return list(self.slabs[layer])
        return [arrays[layer] for arrays in self.client_arrays]


def outputs_like(layers: Sequence[NDArray[np.generic]]) -> list[NDArray[np.floating]]:
    """Uninitialised flat outputs for the layers (float64 for float64 layers, else float32): views
    of one buffer when the layers share that dtype, so the outputs cost their bytes plus at most
    one partly used page, and rules can use the whole buffer as scratch (``output_buffer``)."""
    dtypes = {slab_dtype(layer) for layer in layers}
    if len(dtypes) != 1:
        return [np.empty(layer.size, slab_dtype(layer)) for layer in layers]
    buffer = np.empty(sum(layer.size for layer in layers), dtypes.pop())
    ends = np.cumsum([layer.size for layer in layers])
    return [buffer[end - layer.size : end] for layer, end in zip(layers, ends, strict=True)]


def output_buffer(outputs: Sequence[NDArray[np.floating]]) -> NDArray[np.floating]:
    """The largest contiguous memory the outputs cover: their one buffer (``outputs_like``), or
    else the largest output."""
    shared = outputs[0].base
    if isinstance(shared, np.ndarray) and shared.ndim == 1 and all(out.base is shared for out in outputs) \
            and shared.size == sum(out.size for out in outputs):
        return shared
    return max(outputs, key=lambda out: out.nbytes)


def shape_like(
    flat: Sequence[NDArray[np.floating]], layers: Sequence[NDArray[np.generic]]
) -> Layers:
    """Reshape flat outputs to the global layers' shapes (views, no copies)."""
    return [out.reshape(layer.shape) for out, layer in zip(flat, layers, strict=True)]


def raise_non_finite_input(batch: UpdateBatch, rule: str) -> None:
    """Name the first update holding NaN/Inf; if none does, the result itself overflowed."""
    for i in range(len(batch.global_layers)):
        for k, update in enumerate(batch.layer_updates(i)):
            if not is_all_finite(update):
                raise ValueError(f"client {k} layer {i} contains NaN or Inf")
    raise ValueError(f"{rule} result is not finite (float overflow); updates are too large")


def check_learning_rate(rule: str, value: float) -> float:
    """A server learning rate: finite and > 0 (the name Flower gives it)."""
    return check_real(rule, "server_learning_rate", value, 0.0, float("inf"), low_open=True, high_open=True)


def check_real(
    rule: str, name: str, value: object, low: float, high: float, *, low_open: bool, high_open: bool
) -> float:
    """A finite real hyperparameter inside an interval; the message quotes the interval."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{low:g}, {high:g}{right}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        message = f"{rule} {name} must be a number in {interval}; got {value!r}"
        raise ValueError(message)  # noqa: TRY004
    number = float(value)
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if not math.isfinite(number) or too_low or too_high:
        raise ValueError(f"{rule} {name} must be in {interval}; got {value!r}")
    return number


def check_int(rule: str, name: str, value: object, low: int) -> int:
    """An int hyperparameter ``>= low``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{rule} {name} must be an int >= {low}; got {value!r}")  # noqa: TRY004
    if value < low:
        raise ValueError(f"{rule} {name} must be >= {low}; got {value}")
    return int(value)


class Strategy(ABC):
    """An aggregation rule: client models (or gradients) in, the next global model out."""

    name: ClassVar[str]
    requires_individual_updates: ClassVar[bool] = False
    # True for rules whose kernels reject a non-finite global layer themselves (every
    # layer goes through ``weighted_combination`` before any state changes), which
    # saves a serial pass over the model per call.
    checks_global_in_kernel: ClassVar[bool] = False
    # True for the averaging rules, whose kernels read each client's arrays in place:
    # ``aggregate`` then hands them over as they are instead of copying them into slabs.
    reads_client_arrays: ClassVar[bool] = False

    def aggregate(
        self,
        global_layers: list[NDArray[np.generic]],
        client_layers: list[list[NDArray[np.generic]]],
        num_examples: list[int],
        *,
        client_metrics: list[dict[str, float]] | None = None,
        staleness: list[int] | None = None,
    ) -> Layers:
        """Aggregate per-client layer lists: read in place by the averaging rules
        (``reads_client_arrays``), copied into slabs once for the others."""
        check_global_layers(global_layers, finite=not self.checks_global_in_kernel)
        check_client_layers(global_layers, client_layers)
        if not self.reads_client_arrays:
            slabs = allocate_slabs(global_layers, len(client_layers))
            fill_slabs(slabs, client_layers)
            return self.aggregate_slabs(
                global_layers,
                slabs,
                num_examples,
                client_metrics=client_metrics,
                staleness=staleness,
            )
        batch = self.validated_batch(
            global_layers,
            [],
            flat_client_arrays(global_layers, client_layers),
            num_examples,
            client_metrics=client_metrics,
            staleness=staleness,
        )
        return shape_like(self.aggregate_batch(batch), batch.global_layers)

    def aggregate_slabs(
        self,
        global_layers: list[NDArray[np.generic]],
        slabs: list[Slab],
        num_examples: list[int],
        *,
        client_metrics: list[dict[str, float]] | None = None,
        staleness: list[int] | None = None,
    ) -> Layers:
        """Aggregate updates already laid out as ``(K, d_i)`` slabs (see ``allocate_slabs``)."""
        check_global_layers(global_layers, finite=not self.checks_global_in_kernel)
        check_slabs(global_layers, slabs)
        batch = self.validated_batch(
            global_layers,
            slabs,
            [],
            num_examples,
            client_metrics=client_metrics,
            staleness=staleness,
        )
        return shape_like(self.aggregate_batch(batch), batch.global_layers)

    def validated_batch(
        self,
        global_layers: list[NDArray[np.generic]],
        slabs: list[Slab],
        client_arrays: list[list[NDArray[np.floating]]],
        num_examples: list[int],
        *,
        client_metrics: list[dict[str, float]] | None,
        staleness: list[int] | None,
    ) -> UpdateBatch:
        """The batch of checked slabs or client arrays, once its per-client lists and the
        rule's own preconditions (``check_batch``) hold."""
        num_clients = slabs[0].shape[0] if slabs else len(client_arrays)
        batch = UpdateBatch(
            global_layers=list(global_layers),
            slabs=list(slabs),
            num_examples=check_num_examples(num_examples, num_clients),
            staleness=check_staleness(staleness, num_clients),
            client_metrics=check_client_metrics(client_metrics, num_clients),
            client_arrays=client_arrays,
        )
        self.check_batch(batch)
        return batch

    def check_batch(self, batch: UpdateBatch) -> None:
        """Rule-specific preconditions (client counts, metrics); raise ValueError."""

    @abstractmethod
    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        """Flat new global layers for a validated batch."""

    def state_dict(self) -> dict[str, NDArray[np.generic]]:
        """Server-side state to persist between rounds; empty for stateless rules."""
        return {}

    def load_state_dict(self, state: Mapping[str, NDArray[np.generic]]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise ValueError(f"{self.name} keeps no state; got keys {sorted(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"

    def params(self) -> dict[str, object]:
        """The hyperparameters this rule was created with."""
        return {}
