"""TorchTrainer: state_dict <-> named arrays with exact dtypes, fit, evaluate, mismatch errors."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from torch import nn

from agents.adapters.torch import TorchTrainer
from agents.app import Config, Metrics, Parameters, Trainer, as_trainer


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(nn.functional.max_pool2d(h, 2).flatten(1))


def noop_train(module: nn.Module, config: Config) -> int:
    return 5


def noop_evaluate(module: nn.Module, config: Config) -> tuple[float, int, Metrics]:
    return 0.0, 1, {}


def trainer_for(module: nn.Module) -> TorchTrainer:
    return TorchTrainer(module, train_fn=noop_train, evaluate_fn=noop_evaluate)


def noisy_like(parameters: Parameters, seed: int) -> dict[str, NDArray[Any]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in parameters.items():
        if np.issubdtype(a.dtype, np.integer):
            out[name] = np.asarray(a + 7, dtype=a.dtype)
        else:
            out[name] = rng.standard_normal(a.shape).astype(a.dtype)
    return out


def bits(a: NDArray[Any]) -> NDArray[Any]:
    return a.view(f"u{a.dtype.itemsize}")


def assert_bit_identical(got: Parameters, want: Parameters) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(bits(got[name]), bits(want[name]), err_msg=name)


def test_layers_are_the_state_dict_in_order_with_their_dtypes() -> None:
    torch.manual_seed(0)
    module = ConvNet()
    params = trainer_for(module).get_parameters({})
    assert list(params) == list(module.state_dict())
    assert params["bn.num_batches_tracked"].dtype == np.int64
    assert params["bn.num_batches_tracked"].shape == ()
    assert params["conv.weight"].dtype == np.float32
    assert params["conv.weight"].shape == (4, 1, 3, 3)
    np.testing.assert_array_equal(params["fc.bias"], module.fc.bias.detach().numpy())


def test_float32_and_int64_layers_round_trip_bit_identically() -> None:
    torch.manual_seed(0)
    module = ConvNet()
    trainer = trainer_for(module)
    given = noisy_like(trainer.get_parameters({}), seed=1)
    new, num_examples, metrics = trainer.fit(given, {})
    assert_bit_identical(new, given)
    assert (num_examples, dict(metrics)) == (5, {})
    assert int(module.bn.num_batches_tracked) == int(given["bn.num_batches_tracked"])


@pytest.mark.parametrize(("torch_dtype", "np_dtype"), [
    (torch.bfloat16, np.dtype(ml_dtypes.bfloat16)),
    (torch.float16, np.dtype(np.float16)),
    (torch.float64, np.dtype(np.float64)),
])
def test_half_and_double_modules_keep_their_dtype_bit_identically(
        torch_dtype: torch.dtype, np_dtype: np.dtype[Any]) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).to(torch_dtype)
    trainer = trainer_for(module)
    params = trainer.get_parameters({})
    assert params["0.weight"].dtype == np_dtype
    assert params["1.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(params["0.weight"].astype(np.float32),
                                  module[0].weight.detach().float().numpy())
    given = noisy_like(params, seed=2)
    new, _, _ = trainer.fit(given, {})
    assert_bit_identical(new, given)
    assert module[0].weight.dtype == torch_dtype
    np.testing.assert_array_equal(module[0].weight.detach().float().numpy(),
                                  given["0.weight"].astype(np.float32))


def train_one_epoch(module: nn.Module, config: Config) -> tuple[int, Metrics]:
    torch.manual_seed(3)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    loss = nn.functional.cross_entropy(module(x), y)
    loss.backward()
    # Plain SGD by hand: torch.optim's first use imports torch._dynamo (~1.5 s).
    with torch.no_grad():
        for p in module.parameters():
            p -= float(config["learning_rate"]) * p.grad
            p.grad = None
    return len(y), {"loss": loss.item()}


def test_fit_returns_the_weights_train_fn_produced_as_copies() -> None:
    torch.manual_seed(0)
    module = ConvNet()
    trainer = TorchTrainer(module, train_fn=train_one_epoch, evaluate_fn=noop_evaluate)
    start = trainer.get_parameters({})
    new, num_examples, metrics = trainer.fit(start, {"learning_rate": 0.1})
    assert num_examples == 32
    assert float(metrics["loss"]) > 0
    assert not np.array_equal(new["fc.weight"], start["fc.weight"])
    assert int(new["bn.num_batches_tracked"]) == int(start["bn.num_batches_tracked"]) + 1
    kept = new["fc.weight"].copy()
    trainer.fit(new, {"learning_rate": 0.1})
    np.testing.assert_array_equal(new["fc.weight"], kept)


def test_evaluate_loads_the_parameters_and_returns_the_users_figures() -> None:
    torch.manual_seed(0)
    module = ConvNet()
    seen: dict[str, Any] = {}

    def evaluate(m: nn.Module, config: Config) -> tuple[float, int, Metrics]:
        seen["bias"] = m.fc.bias.detach().numpy().copy()
        seen["training"] = m.training
        return 0.25, 40, {"accuracy": 0.875}

    trainer = TorchTrainer(module, train_fn=noop_train, evaluate_fn=evaluate)
    given = noisy_like(trainer.get_parameters({}), seed=4)
    given["fc.bias"].setflags(write=False)
    assert trainer.evaluate(given, {}) == (0.25, 40, {"accuracy": 0.875})
    np.testing.assert_array_equal(seen["bias"], given["fc.bias"])
    assert seen["training"] is False


def test_a_mismatched_layer_is_named_with_both_shapes() -> None:
    trainer = trainer_for(ConvNet())
    given = dict(trainer.get_parameters({}))
    given["fc.weight"] = np.zeros((3, 10), dtype=np.float32)
    with pytest.raises(ValueError, match=r"'fc\.weight': expected shape \(3, 64\) float32, "
                                         r"received shape \(3, 10\) float32"):
        trainer.fit(given, {})


def test_missing_unexpected_and_wrong_dtype_layers_are_named() -> None:
    trainer = trainer_for(ConvNet())
    given = dict(trainer.get_parameters({}))
    del given["bn.running_var"]
    given["extra"] = np.zeros(2, dtype=np.float32)
    given["bn.num_batches_tracked"] = np.zeros((), dtype=np.float32)
    with pytest.raises(ValueError) as raised:
        trainer.evaluate(given, {})
    message = str(raised.value)
    assert "'bn.running_var' is missing (expected shape (4,) float32)" in message
    assert "'extra' is not in the module (received shape (2,) float32)" in message
    assert ("'bn.num_batches_tracked': expected shape () int64, received shape () float32"
            in message)


def test_train_fn_returning_none_reports_the_configured_count() -> None:
    module = nn.Linear(2, 2)
    trainer = TorchTrainer(module, train_fn=lambda m, c: None, evaluate_fn=noop_evaluate,
                           num_examples=12)
    assert trainer.fit(trainer.get_parameters({}), {})[1] == 12
    trainer.num_examples = None
    with pytest.raises(ValueError, match="num_examples"):
        trainer.fit(trainer.get_parameters({}), {})


def test_a_torch_trainer_is_a_trainer() -> None:
    trainer = trainer_for(nn.Linear(2, 2))
    assert isinstance(trainer, Trainer)
    assert as_trainer(trainer) is trainer
