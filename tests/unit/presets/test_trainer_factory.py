"""create_trainer, model_layer_specs and check_weights: the contract the server relies on."""

import numpy as np
import pytest

from federated_learning.presets import (
    LayerSpec,
    WeightsMismatch,
    check_weights,
    create_trainer,
    model_layer_specs,
)


def test_softmax_layer_specs() -> None:
    specs = model_layer_specs("softmax", num_features=64, num_classes=10)
    assert specs == (
        LayerSpec("dense.weight", (64, 10), "float32"),
        LayerSpec("dense.bias", (10,), "float32"),
    )


def test_mlp_layer_specs_follow_hidden() -> None:
    specs = model_layer_specs("mlp", num_features=64, num_classes=10, hidden=32)
    assert [(s.name, s.shape) for s in specs] == [
        ("hidden.weight", (64, 32)),
        ("hidden.bias", (32,)),
        ("output.weight", (32, 10)),
        ("output.bias", (10,)),
    ]


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_init_model_matches_its_specs(name: str) -> None:
    trainer = create_trainer(name, num_features=5, num_classes=3)
    check_weights(trainer.init_model(0), trainer.layer_specs())


def test_check_weights_refuses_missing_extra_and_nonfinite_layers() -> None:
    specs = model_layer_specs("softmax", num_features=2, num_classes=3)
    good = {"dense.weight": np.zeros((2, 3), np.float32), "dense.bias": np.zeros(3, np.float32)}
    with pytest.raises(WeightsMismatch, match="layers must be"):
        check_weights({"dense.weight": good["dense.weight"]}, specs)
    with pytest.raises(WeightsMismatch, match="layers must be"):
        check_weights({**good, "extra": np.zeros(1, np.float32)}, specs)
    with pytest.raises(WeightsMismatch, match="'dense.bias' contains NaN or Inf"):
        check_weights({**good, "dense.bias": np.array([0, np.inf, 0], np.float32)}, specs)


def test_unknown_trainer_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"unknown trainer 'cnn'; expected one of \['softmax', 'mlp'\]"
    ):
        create_trainer("cnn", num_features=4, num_classes=2)


def test_unknown_parameter_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"unknown parameter\(s\) \['hidden'\] for trainer 'softmax'"
    ):
        create_trainer("softmax", num_features=4, num_classes=2, hidden=8)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"hidden": 0}, "hidden must be >= 1"),
        ({"hidden": 8.5}, "'hidden' must be an integer"),
        ({"hidden": True}, "'hidden' must be an integer"),
        ({"weight_decay": -0.1}, "weight_decay must be finite and >= 0"),
        ({"weight_decay": "0.1"}, "'weight_decay' must be a number"),
    ],
)
def test_bad_mlp_parameters_are_refused(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_trainer("mlp", num_features=4, num_classes=2, **params)


def test_bad_model_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_features must be >= 1"):
        create_trainer("softmax", num_features=0, num_classes=2)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        create_trainer("softmax", num_features=4, num_classes=1)
