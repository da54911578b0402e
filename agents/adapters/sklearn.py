"""A scikit-learn estimator as an :class:`agents.app.Trainer`, trained with warm start.

Layers, in this order, with the dtype the estimator holds (float64: features are cast to
float64 so that every agent's layers are float64 whatever its data's dtype):

- linear models (``coef_``, ``intercept_``: LogisticRegression, SGDClassifier, SGDRegressor,
  LinearRegression, Ridge, ...): ``coef``, ``intercept``;
- ``MLPClassifier`` / ``MLPRegressor`` (``coefs_``, ``intercepts_``): ``coefs.0``,
  ``intercepts.0``, ``coefs.1``, ``intercepts.1``, ...

Local training continues from the parameters it is given:

- estimators with ``partial_fit`` (SGD models, MLPs with ``solver="sgd"`` or ``"adam"``): one
  ``partial_fit`` per local epoch. Their optimiser state (SGD's step count ``t_``, Adam's
  moments) carries over between rounds, as between any two ``partial_fit`` calls.
- the others (LogisticRegression, MLP with ``solver="lbfgs"``): ``fit`` with
  ``warm_start=True`` and ``max_iter`` = local epochs. Estimators without warm start
  (LinearRegression, Ridge) re-solve on the local data: their result ignores the parameters.

``config["local_epochs"]`` is the only setting read; without it a round is one
``partial_fit``, or one ``fit`` with the estimator's own ``max_iter``. The trainer owns the
estimator and sets ``warm_start`` and ``max_iter`` on it.

Every agent must hold the same layout even when its shard lacks some classes, so a classifier
learns all ``classes`` (default: the labels of its train and eval data). ``partial_fit`` is
told them on its first call. ``fit`` would take the classes from ``y`` alone, so one
zero-weight example (all-zero features) is appended per missing class: it fixes ``classes_``
and the layer shapes without changing the loss (sample weights enter the loss as a weighted
mean). The estimator is initialised by one such local ``fit`` / ``partial_fit`` when it has
no coefficients yet.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, hinge_loss, log_loss, mean_squared_error

from agents.app import Config, Metrics, Parameters, layout_of

Float64Array = NDArray[np.float64]


class SklearnTrainer:
    """A scikit-learn linear model or MLP, trained locally with warm start (module doc)."""

    def __init__(self, estimator: Any, x_train: ArrayLike, y_train: ArrayLike,
                 x_eval: ArrayLike, y_eval: ArrayLike, *, classes: ArrayLike | None = None
                 ) -> None:
        if getattr(estimator, "average", False):
            raise ValueError("SGD with average=True is not supported: its running average "
                             "is not carried in the layers")
        self.estimator = estimator
        self.x_train = np.asarray(x_train, dtype=np.float64)
        self.y_train = np.asarray(y_train)
        self.x_eval = np.asarray(x_eval, dtype=np.float64)
        self.y_eval = np.asarray(y_eval)
        self.is_classifier = bool(is_classifier(estimator))
        self.classes = self._resolve_classes(classes)
        self.incremental = hasattr(estimator, "partial_fit")
        if self.incremental and "warm_start" in estimator.get_params():
            # MLP's warm_start makes partial_fit refuse a shard lacking some classes;
            # partial_fit continues from the current weights without it.
            estimator.set_params(warm_start=False)
        if not (hasattr(estimator, "coefs_") or hasattr(estimator, "coef_")):
            self._train(epochs=None)
        self.layout = layout_of(self.get_parameters({}))

    def _resolve_classes(self, classes: ArrayLike | None) -> NDArray[Any] | None:
        if not self.is_classifier:
            return None
        seen = np.union1d(self.y_train, self.y_eval)
        held = getattr(self.estimator, "classes_", None)
        wanted = seen if classes is None else np.unique(np.asarray(classes))
        if held is not None:
            held = np.asarray(held)
            if classes is not None and not np.array_equal(held, wanted):
                raise ValueError(f"the estimator was fitted with classes {held.tolist()}; "
                                 f"got classes {wanted.tolist()}")
            wanted = held
        unknown = np.setdiff1d(seen, wanted)
        if unknown.size:
            raise ValueError(f"labels {unknown.tolist()} are not in classes {wanted.tolist()}")
        return wanted

    def get_parameters(self, config: Config) -> Parameters:
        est = self.estimator
        if hasattr(est, "coefs_"):
            layers: dict[str, NDArray[Any]] = {}
            for i, (w, b) in enumerate(zip(est.coefs_, est.intercepts_, strict=True)):
                layers[f"coefs.{i}"] = np.array(w, copy=True)
                layers[f"intercepts.{i}"] = np.array(b, copy=True)
            return layers
        return {"coef": np.array(est.coef_, copy=True),
                "intercept": np.array(est.intercept_, copy=True)}

    def set_parameters(self, parameters: Parameters) -> None:
        """Load ``parameters`` into the estimator (copies), after checking their layout."""
        self._check_layout(parameters)
        arrays = {name: np.array(a, copy=True, order="C") for name, a in parameters.items()}
        est = self.estimator
        if hasattr(est, "coefs_"):
            count = len(est.coefs_)
            est.coefs_ = [arrays[f"coefs.{i}"] for i in range(count)]
            est.intercepts_ = [arrays[f"intercepts.{i}"] for i in range(count)]
        else:
            est.coef_ = arrays["coef"]
            est.intercept_ = arrays["intercept"]

    def _check_layout(self, parameters: Parameters) -> None:
        received = layout_of(parameters)
        if list(received) != list(self.layout):
            raise ValueError(f"expected layers {list(self.layout)}; got {list(received)}")
        for name, (shape, dtype) in self.layout.items():
            got_shape, got_dtype = received[name]
            if (got_shape, got_dtype) != (shape, dtype):
                raise ValueError(f"layer '{name}': expected shape {shape} {dtype}; "
                                 f"got {got_shape} {got_dtype}")

    def fit(self, parameters: Parameters, config: Config) -> tuple[Parameters, int, Metrics]:
        epochs = _local_epochs(config)
        self.set_parameters(parameters)
        self._train(epochs)
        loss, metrics = self._score(self.x_train, self.y_train)
        return self.get_parameters(config), len(self.y_train), {"loss": loss, **metrics}

    def evaluate(self, parameters: Parameters, config: Config) -> tuple[float, int, Metrics]:
        self.set_parameters(parameters)
        loss, metrics = self._score(self.x_eval, self.y_eval)
        return loss, len(self.y_eval), metrics

    def _train(self, epochs: int | None) -> None:
        est = self.estimator
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.incremental:
                for _ in range(epochs or 1):
                    if self.classes is not None and not hasattr(est, "classes_"):
                        est.partial_fit(self.x_train, self.y_train, classes=self.classes)
                    else:
                        est.partial_fit(self.x_train, self.y_train)
                return
            est.set_params(**_warm_start_params(est.get_params(), epochs))
            missing = None if self.classes is None else np.setdiff1d(self.classes, self.y_train)
            if missing is None or missing.size == 0:
                est.fit(self.x_train, self.y_train)
            else:
                est.fit(*_pad_classes(self.x_train, self.y_train, missing))

    def _score(self, x: Float64Array, y: NDArray[Any]) -> tuple[float, dict[str, float]]:
        """(loss, metrics): log loss (hinge loss without ``predict_proba``) and accuracy for a
        classifier, mean squared error for a regressor."""
        est = self.estimator
        if not self.is_classifier:
            return float(mean_squared_error(y, est.predict(x))), {}
        if hasattr(est, "predict_proba"):
            loss = log_loss(y, est.predict_proba(x), labels=est.classes_)
        else:
            loss = hinge_loss(y, est.decision_function(x), labels=est.classes_)
        return float(loss), {"accuracy": float(accuracy_score(y, est.predict(x)))}


def _local_epochs(config: Config) -> int | None:
    epochs = config.get("local_epochs")
    if epochs is None:
        return None
    if isinstance(epochs, bool) or not isinstance(epochs, int | np.integer) or epochs < 1:
        raise ValueError(f"config 'local_epochs' is {epochs!r}; must be an integer >= 1")
    return int(epochs)


def _warm_start_params(held: dict[str, Any], epochs: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if "warm_start" in held:
        params["warm_start"] = True
    if epochs is not None and "max_iter" in held:
        params["max_iter"] = epochs
    return params


def _pad_classes(x: Float64Array, y: NDArray[Any], missing: NDArray[Any]
                 ) -> tuple[Float64Array, NDArray[Any], Float64Array]:
    """(x, y, sample_weight) with one zero-weight, all-zero example of each ``missing`` class."""
    x_pad = np.concatenate([x, np.zeros((missing.size, x.shape[1]), dtype=x.dtype)])
    y_pad = np.concatenate([y, missing.astype(y.dtype)])
    weights = np.concatenate([np.ones(y.shape[0]), np.zeros(missing.size)])
    return x_pad, y_pad, weights
