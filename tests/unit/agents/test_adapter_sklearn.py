"""SklearnTrainer: layouts, warm start from the given parameters, missing classes, mismatches."""

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, SGDClassifier, SGDRegressor
from sklearn.neural_network import MLPClassifier, MLPRegressor

from agents.adapters.sklearn import SklearnTrainer
from agents.app import Config, Parameters, Trainer, layout_of
from agents.data import load_digits_dataset

CLASSES = np.arange(10)
ESTIMATORS: dict[str, Callable[[], Any]] = {
    "logreg": lambda: LogisticRegression(max_iter=20),
    "sgd": lambda: SGDClassifier(loss="log_loss", random_state=0),
    "sgd-hinge": lambda: SGDClassifier(random_state=0),
    # warm_start=True on purpose: the trainer must clear it for partial_fit on a lacking shard
    "mlp": lambda: MLPClassifier(hidden_layer_sizes=(16,), warm_start=True, batch_size=32,
                                 learning_rate_init=0.05, random_state=0),
    "mlp-lbfgs": lambda: MLPClassifier(hidden_layer_sizes=(16,), solver="lbfgs", max_iter=30,
                                       random_state=0),
}
LINEAR_LAYOUT = {"coef": ((10, 64), "float64"), "intercept": ((10,), "float64")}
MLP_LAYOUT = {"coefs.0": ((64, 16), "float64"), "intercepts.0": ((16,), "float64"),
              "coefs.1": ((16, 10), "float64"), "intercepts.1": ((10,), "float64")}
CONFIG: Config = {"local_epochs": 2, "server_round": 1}
ONE_EPOCH: Config = {"local_epochs": 1}


def shard(start: int, stop: int, drop: tuple[int, ...] = ()
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits [start, stop) without the labels in ``drop``: x float32, y int64, 3/4 train."""
    data = load_digits_dataset()
    x, y = data.x[start:stop], data.y[start:stop]
    keep = ~np.isin(y, drop)
    x, y = x[keep], y[keep]
    cut = 3 * len(y) // 4
    return x[:cut], y[:cut], x[cut:], y[cut:]


def make_trainer(kind: str, start: int = 0, stop: int = 400, drop: tuple[int, ...] = (),
                 classes: np.ndarray | None = CLASSES) -> SklearnTrainer:
    return SklearnTrainer(ESTIMATORS[kind](), *shard(start, stop, drop), classes=classes)


def distance(a: Parameters, b: Parameters) -> float:
    return float(sum(np.linalg.norm(a[name] - b[name]) for name in a))


@pytest.mark.parametrize("kind", list(ESTIMATORS))
def test_get_fit_evaluate_round_trip_keeps_the_layout(kind: str) -> None:
    trainer = make_trainer(kind)
    assert isinstance(trainer, Trainer)
    expected = MLP_LAYOUT if kind.startswith("mlp") else LINEAR_LAYOUT

    start = trainer.get_parameters({})
    new, num_examples, metrics = trainer.fit(start, CONFIG)
    loss, num_eval, eval_metrics = trainer.evaluate(new, CONFIG)

    assert layout_of(start) == layout_of(new) == expected
    assert num_examples == 300 and num_eval == 100
    assert np.isfinite(metrics["loss"]) and 0.5 <= float(metrics["accuracy"]) <= 1.0
    assert np.isfinite(loss) and 0.5 <= float(eval_metrics["accuracy"]) <= 1.0


@pytest.mark.parametrize("kind", list(ESTIMATORS))
def test_fit_continues_from_the_given_parameters(kind: str) -> None:
    other = make_trainer(kind, start=800, stop=1200)
    from_other, _, _ = other.fit(other.get_parameters({}), CONFIG)
    own = make_trainer(kind).get_parameters({})

    after_other, _, _ = make_trainer(kind).fit(from_other, ONE_EPOCH)
    again, _, _ = make_trainer(kind).fit(from_other, ONE_EPOCH)
    after_own, _, _ = make_trainer(kind).fit(own, ONE_EPOCH)

    for name in own:
        np.testing.assert_array_equal(after_other[name], again[name])
    assert distance(after_other, from_other) < distance(after_other, own)
    assert distance(after_own, own) < distance(after_own, from_other)


@pytest.mark.parametrize("kind", list(ESTIMATORS))
def test_an_agent_lacking_classes_has_the_full_layout(kind: str) -> None:
    full = make_trainer(kind)
    lacking = make_trainer(kind, drop=(3, 8, 9))

    new, _, _ = lacking.fit(full.get_parameters({}), CONFIG)
    loss, _, metrics = lacking.evaluate(new, CONFIG)

    assert layout_of(lacking.get_parameters({})) == layout_of(full.get_parameters({}))
    assert layout_of(new) == layout_of(full.get_parameters({}))
    np.testing.assert_array_equal(lacking.estimator.classes_, CLASSES)
    assert np.isfinite(loss) and "accuracy" in metrics


def test_without_classes_a_lacking_agent_learns_only_its_own_labels() -> None:
    trainer = make_trainer("logreg", drop=(3, 8, 9), classes=None)
    assert layout_of(trainer.get_parameters({}))["coef"] == ((7, 64), "float64")


def test_labels_outside_the_given_classes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"labels \[9\] are not in classes"):
        make_trainer("logreg", classes=np.arange(9))


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: {**p, "coef": p["coef"][:9]},
     "layer 'coef': expected shape (10, 64) float64; got (9, 64) float64"),
    (lambda p: {**p, "intercept": p["intercept"].astype(np.float32)},
     "layer 'intercept': expected shape (10,) float64; got (10,) float32"),
    (lambda p: {"coef": p["coef"]},
     "expected layers ['coef', 'intercept']; got ['coef']"),
])
def test_a_layout_mismatch_names_the_layer_and_both_layouts(
        change: Callable[[Parameters], Parameters], message: str) -> None:
    trainer = make_trainer("logreg")
    wrong = change(trainer.get_parameters({}))
    for method in (trainer.fit, trainer.evaluate):
        with pytest.raises(ValueError) as info:
            method(wrong, CONFIG)
        assert str(info.value) == message


def test_a_bad_local_epochs_is_refused() -> None:
    trainer = make_trainer("sgd")
    with pytest.raises(ValueError, match="config 'local_epochs' is 0; must be an integer >= 1"):
        trainer.fit(trainer.get_parameters({}), {"local_epochs": 0})


@pytest.mark.parametrize("estimator", [SGDRegressor(random_state=0),
                                       MLPRegressor(hidden_layer_sizes=(8,), random_state=0)])
def test_a_regressor_reports_its_mean_squared_error(estimator: Any) -> None:
    x, y, x_eval, y_eval = shard(0, 400)
    trainer = SklearnTrainer(estimator, x, y.astype(np.float64), x_eval, y_eval.astype(np.float64))

    new, _, metrics = trainer.fit(trainer.get_parameters({}), CONFIG)
    loss, num_eval, eval_metrics = trainer.evaluate(new, CONFIG)

    predictions = estimator.predict(x_eval.astype(np.float64))
    assert loss == pytest.approx(float(np.mean((predictions - y_eval) ** 2)))
    assert num_eval == 100 and dict(eval_metrics) == {} and set(metrics) == {"loss"}
