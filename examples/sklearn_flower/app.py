"""A Flower ``NumPyClient`` around scikit-learn's ``LogisticRegression`` on the bundled digits.

The client is written as Flower's scikit-learn logistic-regression tutorial writes one: its
parameters are ``[coef_ (10, 64) float64, intercept_ (10,) float64]``, ``fit`` sets them and
refits with ``warm_start``, ``evaluate`` returns the log loss and the accuracy. It knows nothing
of this system; ``agents.app.FlowerTrainer`` runs it unchanged (layers ``param_000``,
``param_001``).

One change from the tutorial: ``LogisticRegression.fit`` takes its classes from ``y``, so a
non-IID shard lacking a digit would change ``coef_``'s shape. Each shard gets one zero-weight,
all-zero example of every digit it lacks, which fixes the classes without changing the loss.

Environment: ``FL_EXAMPLE_CLIENTS`` (default 10) clients, ``FL_EXAMPLE_PARTITION``
(``dirichlet:0.5`` by default, or ``iid``) from ``agents.data.make_client_datasets`` seed 0.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.client import NumPyClient
from numpy.typing import NDArray
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from agents.app import flower_layer_names
from agents.data import ClientData, Dataset, make_client_datasets

NUM_CLASSES = 10
NUM_FEATURES = 64
DEFAULT_CLIENTS = 10
DEFAULT_PARTITION = "dirichlet:0.5"
DATA_SEED = 0
# Offline FedAvg of 10 clients from zeros, weighted by examples, 10 rounds, global test split
# (360 digits): dirichlet:0.5 reaches 0.956 at round 2 and ends at 0.956; iid 0.944 at round 2,
# 0.947 at the end. A fit takes ~3 ms with one BLAS thread (~25 ms, 0.11 s at most, with BLAS
# threads on 2 busy cores). Fewer iterations learn too slowly (max_iter 2: 0.91 after 10
# rounds); more drift to a skewed shard's own optimum (max_iter 20 with C 1: 0.92). A smaller
# C underfits (C 0.1: at most 0.90).
LOCAL_MAX_ITER = 10
C = 10.0

Arrays = list[NDArray[Any]]


def new_model() -> LogisticRegression:
    """The tutorial's model: warm-started L2 logistic regression, zeros for all ten digits."""
    model = LogisticRegression(C=C, max_iter=LOCAL_MAX_ITER, warm_start=True)
    model.classes_ = np.arange(NUM_CLASSES)
    model.coef_ = np.zeros((NUM_CLASSES, NUM_FEATURES))
    model.intercept_ = np.zeros(NUM_CLASSES)
    return model


def get_model_parameters(model: LogisticRegression) -> Arrays:
    return [model.coef_, model.intercept_]


def set_model_params(model: LogisticRegression, params: Arrays) -> None:
    model.coef_ = params[0]
    model.intercept_ = params[1]


class DigitsLogRegClient(NumPyClient):
    """Flower's scikit-learn logistic-regression client, on one shard of the digits."""

    def __init__(self, model: LogisticRegression, x_train: NDArray[np.float64],
                 y_train: NDArray[np.int64], x_test: NDArray[np.float64],
                 y_test: NDArray[np.int64]) -> None:
        self.model = model
        self.num_examples = len(y_train)
        self.x_train, self.y_train, self.sample_weight = with_every_class(x_train, y_train)
        self.x_test, self.y_test = x_test, y_test

    def get_parameters(self, config: dict[str, Any]) -> Arrays:
        return get_model_parameters(self.model)

    def fit(self, parameters: Arrays, config: dict[str, Any]
            ) -> tuple[Arrays, int, dict[str, Any]]:
        set_model_params(self.model, parameters)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(self.x_train, self.y_train, sample_weight=self.sample_weight)
        return get_model_parameters(self.model), self.num_examples, {}

    def evaluate(self, parameters: Arrays, config: dict[str, Any]
                 ) -> tuple[float, int, dict[str, Any]]:
        set_model_params(self.model, parameters)
        loss = log_loss(self.y_test, self.model.predict_proba(self.x_test),
                        labels=self.model.classes_)
        accuracy = self.model.score(self.x_test, self.y_test)
        return float(loss), len(self.x_test), {"accuracy": float(accuracy)}


def with_every_class(x: NDArray[np.float64], y: NDArray[np.int64]
                     ) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.float64]]:
    """(x, y, sample_weight) plus one zero-weight, all-zero example of each digit absent
    from ``y``."""
    missing = np.setdiff1d(np.arange(NUM_CLASSES), y)
    x_all = np.concatenate([x, np.zeros((missing.size, x.shape[1]))])
    y_all = np.concatenate([y, missing.astype(y.dtype)])
    weights = np.concatenate([np.ones(y.size), np.zeros(missing.size)])
    return x_all, y_all, weights


@lru_cache(maxsize=4)
def _datasets(num_clients: int, partition: str) -> tuple[list[ClientData], Dataset]:
    return make_client_datasets(num_clients, partition, seed=DATA_SEED)


def _settings() -> tuple[int, str]:
    clients = int(os.environ.get("FL_EXAMPLE_CLIENTS", DEFAULT_CLIENTS))
    if clients < 1:
        raise ValueError(f"FL_EXAMPLE_CLIENTS is {clients}; must be >= 1")
    return clients, os.environ.get("FL_EXAMPLE_PARTITION", DEFAULT_PARTITION)


def make_client(agent_id: str) -> DigitsLogRegClient:
    """The client for ``agent_id``: shard (trailing integer of the id) mod the client count."""
    match = re.search(r"(\d+)$", agent_id)
    if match is None:
        raise ValueError(f"agent id '{agent_id}' does not end in a number; "
                         "expected e.g. 'sklearn-7'")
    num_clients, partition = _settings()
    data = _datasets(num_clients, partition)[0][int(match.group(1)) % num_clients]
    return DigitsLogRegClient(new_model(), data.train.x.astype(np.float64), data.train.y,
                              data.eval.x.astype(np.float64), data.eval.y)


def initial_parameters() -> dict[str, NDArray[np.float64]]:
    """Zeros, named as ``agents.app.FlowerTrainer`` names the client's layers."""
    arrays = [np.zeros((NUM_CLASSES, NUM_FEATURES)), np.zeros(NUM_CLASSES)]
    return dict(zip(flower_layer_names(len(arrays)), arrays, strict=True))


def test_accuracy(params: Mapping[str, NDArray[Any]]) -> float:
    """Accuracy of ``params`` (in layer order) on the global test split."""
    model = new_model()
    set_model_params(model, [np.asarray(a, dtype=np.float64) for a in params.values()])
    test = _datasets(*_settings())[1]
    return float(model.score(test.x.astype(np.float64), test.y))
