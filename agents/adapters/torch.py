"""A PyTorch ``nn.Module`` as an :class:`agents.app.Trainer`.

The layers are the module's ``state_dict()``: parameters and buffers, in their order, each as
a NumPy array of the same dtype. ``torch.bfloat16`` becomes ``ml_dtypes.bfloat16`` (the bits
are reinterpreted, never rounded); integer buffers such as BatchNorm's ``num_batches_tracked``
stay integer arrays. Training and evaluation are the user's own functions:

- ``train_fn(module, config)`` trains ``module`` in place for one round and returns the number
  of training examples, or ``(number, metrics)``;
- ``evaluate_fn(module, config)`` returns ``(loss, number of examples, metrics)``, the metrics
  with ``accuracy`` where the model has one.

Only users who have PyTorch import this module; nothing else in ``agents`` imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, TypeAlias

import ml_dtypes
import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from agents.app import Config, Metrics, Parameters

TrainResult: TypeAlias = int | tuple[int, Metrics] | None
TrainFn: TypeAlias = Callable[[nn.Module, Config], TrainResult]
EvaluateFn: TypeAlias = Callable[[nn.Module, Config], tuple[float, int, Metrics]]

# NumPy has no bfloat16: its arrays travel as ml_dtypes.bfloat16, through an int16 view.
_BIT_VIEWS: dict[torch.dtype, tuple[np.dtype[Any], torch.dtype, np.dtype[Any]]] = {
    torch.bfloat16: (np.dtype(ml_dtypes.bfloat16), torch.int16, np.dtype(np.int16)),
}


def tensor_to_array(tensor: torch.Tensor) -> NDArray[Any]:
    """A copy of ``tensor`` on the CPU as a NumPy array of the same dtype and shape."""
    t = tensor.detach().to("cpu", copy=True)
    if t.dtype in _BIT_VIEWS:
        np_dtype, int_dtype, _ = _BIT_VIEWS[t.dtype]
        return t.contiguous().view(int_dtype).numpy().view(np_dtype)
    return t.numpy()


@cache
def numpy_dtype_of(dtype: torch.dtype) -> np.dtype[Any]:
    """The NumPy dtype that carries a tensor of ``dtype``."""
    if dtype in _BIT_VIEWS:
        return _BIT_VIEWS[dtype][0]
    return tensor_to_array(torch.empty((), dtype=dtype)).dtype


def array_to_tensor(array: NDArray[Any], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of ``dtype`` holding a copy of ``array`` (already of the matching dtype)."""
    if dtype in _BIT_VIEWS:
        np_int = _BIT_VIEWS[dtype][2]
        bits = np.array(array, copy=True, order="C").view(np_int)
        return torch.from_numpy(bits).view(dtype)
    # A copy: the runtime's arrays may be read-only views of a received buffer.
    return torch.from_numpy(np.array(array, copy=True, order="C"))


def _describe(shape: tuple[int, ...], dtype: object) -> str:
    return f"shape {shape} {dtype}"


def layout_mismatches(expected: Mapping[str, torch.Tensor], received: Parameters) -> list[str]:
    """What differs between the module's state_dict and the given arrays, one line per layer."""
    problems = []
    for name, tensor in expected.items():
        want = _describe(tuple(tensor.shape), numpy_dtype_of(tensor.dtype))
        if name not in received:
            problems.append(f"layer '{name}' is missing (expected {want})")
            continue
        array = np.asarray(received[name])
        got = _describe(tuple(array.shape), array.dtype)
        if tuple(array.shape) != tuple(tensor.shape) or array.dtype != numpy_dtype_of(tensor.dtype):
            problems.append(f"layer '{name}': expected {want}, received {got}")
    for name in received:
        if name not in expected:
            array = np.asarray(received[name])
            got = _describe(tuple(array.shape), array.dtype)
            problems.append(f"layer '{name}' is not in the module (received {got})")
    return problems


class TorchTrainer:
    """An ``nn.Module`` with the user's train and evaluate functions, as a Trainer.

    ``num_examples`` is the count reported when ``train_fn`` returns ``None``. The module is
    put in ``train()`` mode before ``train_fn`` and in ``eval()`` mode before ``evaluate_fn``.
    """

    def __init__(self, module: nn.Module, *, train_fn: TrainFn, evaluate_fn: EvaluateFn,
                 num_examples: int | None = None) -> None:
        self.module = module
        self.train_fn = train_fn
        self.evaluate_fn = evaluate_fn
        self.num_examples = num_examples

    def _state(self) -> dict[str, torch.Tensor]:
        state = self.module.state_dict()
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state_dict entry '{name}' is a {type(value).__name__}, not a "
                                "tensor; only tensors can be federated")
        return dict(state)

    def get_parameters(self, config: Config) -> Parameters:
        return {name: tensor_to_array(t) for name, t in self._state().items()}

    def load(self, parameters: Parameters) -> None:
        """Copy ``parameters`` into the module; ValueError if they do not match its layers."""
        state = self._state()
        problems = layout_mismatches(state, parameters)
        if problems:
            raise ValueError(f"the parameters do not match {type(self.module).__name__}'s "
                             "state_dict: " + "; ".join(problems))
        self.module.load_state_dict(
            {name: array_to_tensor(np.asarray(parameters[name]), t.dtype)
             for name, t in state.items()}, strict=True)

    def fit(self, parameters: Parameters, config: Config) -> tuple[Parameters, int, Metrics]:
        self.load(parameters)
        self.module.train()
        num_examples, metrics = self._train_result(self.train_fn(self.module, config))
        return self.get_parameters(config), num_examples, metrics

    def evaluate(self, parameters: Parameters, config: Config) -> tuple[float, int, Metrics]:
        self.load(parameters)
        self.module.eval()
        loss, num_examples, metrics = self.evaluate_fn(self.module, config)
        return float(loss), int(num_examples), dict(metrics)

    def _train_result(self, result: TrainResult) -> tuple[int, Metrics]:
        if isinstance(result, tuple):
            count, metrics = result
            return int(count), dict(metrics)
        if result is not None:
            return int(result), {}
        if self.num_examples is None:
            raise ValueError("train_fn returned None and the TorchTrainer has no num_examples; "
                             "return the number of training examples or pass num_examples=")
        return self.num_examples, {}
