"""Softmax regression: gradients, FedProx pull, convergence, determinism, input checks."""

from collections.abc import Callable

import numpy as np
import pytest

from federated_learning.presets import WeightsMismatch, create_trainer
from federated_learning.presets.common import Params, log_softmax
from federated_learning.presets.softmax import softmax_loss_and_grad


def numeric_grad(loss: Callable[[Params], float], params: Params, eps: float = 1e-6) -> Params:
    grads = {}
    for name, p in params.items():
        g = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            up = loss(params)
            p[i] = old - eps
            down = loss(params)
            p[i] = old
            g[i] = (up - down) / (2 * eps)
        grads[name] = g
    return grads


def blobs(n_per_class: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    x = np.concatenate([c + 0.5 * rng.standard_normal((n_per_class, 2)) for c in centres])
    y = np.repeat(np.arange(3), n_per_class)
    return x.astype(np.float32), y.astype(np.int64)


def test_softmax_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 4))
    y = rng.integers(0, 3, size=7)
    params = {"dense.weight": rng.standard_normal((4, 3)), "dense.bias": rng.standard_normal(3)}
    _, grads = softmax_loss_and_grad(params, x, y)
    expected = numeric_grad(lambda p: softmax_loss_and_grad(p, x, y)[0], params)
    for name in params:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-6, atol=1e-8)


def test_log_softmax_is_stable_for_huge_logits() -> None:
    logp = log_softmax(np.array([[1000.0, 0.0], [-1000.0, -1000.0]]))
    np.testing.assert_allclose(logp, [[0.0, -1000.0], [np.log(0.5), np.log(0.5)]])


def test_softmax_learns_separable_blobs() -> None:
    x, y = blobs()
    trainer = create_trainer("softmax", num_features=2, num_classes=3)
    weights, result = trainer.train(
        trainer.init_model(0), x, y, epochs=20, batch_size=8, learning_rate=0.5, seed=0
    )
    assert result.accuracy >= 0.98
    assert result.num_examples == 90
    assert result.steps == 20 * 12
    assert trainer.evaluate(weights, x, y).accuracy == result.accuracy


def test_large_proximal_mu_keeps_weights_near_global() -> None:
    x, y = blobs()
    trainer = create_trainer("softmax", num_features=2, num_classes=3)
    start = trainer.init_model(0)
    drifts = []
    for mu in [0.0, 1.0, 10.0]:
        trained, _ = trainer.train(
            start, x, y, epochs=5, batch_size=8, learning_rate=0.05, proximal_mu=mu, seed=0
        )
        drifts.append(np.linalg.norm(trained["dense.weight"] - start["dense.weight"]))
    assert drifts[0] > drifts[1] > drifts[2]
    assert drifts[2] < 0.2 * drifts[0]


def test_weight_decay_shrinks_weights() -> None:
    x, y = blobs()
    plain = create_trainer("softmax", num_features=2, num_classes=3)
    decayed = create_trainer("softmax", num_features=2, num_classes=3, weight_decay=0.1)
    w_plain, _ = plain.train(
        plain.init_model(0), x, y, epochs=10, batch_size=8, learning_rate=0.5, seed=0
    )
    w_decayed, _ = decayed.train(
        decayed.init_model(0), x, y, epochs=10, batch_size=8, learning_rate=0.5, seed=0
    )
    assert np.linalg.norm(w_decayed["dense.weight"]) < np.linalg.norm(w_plain["dense.weight"])


def test_softmax_training_is_deterministic_under_seed() -> None:
    x, y = blobs()
    trainer = create_trainer("softmax", num_features=2, num_classes=3)
    a, b, c = (
        trainer.train(
            trainer.init_model(3), x, y, epochs=2, batch_size=8, learning_rate=0.1, seed=seed
        )[0]
        for seed in (7, 7, 8)
    )
    np.testing.assert_array_equal(a["dense.weight"], b["dense.weight"])
    assert not np.array_equal(a["dense.weight"], c["dense.weight"])


def test_softmax_returns_float32_layers_in_spec_order() -> None:
    x, y = blobs()
    trainer = create_trainer("softmax", num_features=2, num_classes=3)
    weights, _ = trainer.train(
        trainer.init_model(0), x, y, epochs=1, batch_size=4, learning_rate=0.1, seed=0
    )
    assert list(weights) == ["dense.weight", "dense.bias"]
    assert all(w.dtype == np.float32 for w in weights.values())


def test_train_does_not_modify_its_input_weights() -> None:
    x, y = blobs()
    trainer = create_trainer("softmax", num_features=2, num_classes=3)
    start = trainer.init_model(0)
    copy = {k: v.copy() for k, v in start.items()}
    trainer.train(start, x, y, epochs=1, batch_size=8, learning_rate=0.5, seed=0)
    np.testing.assert_array_equal(start["dense.weight"], copy["dense.weight"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be >= 1"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("learning_rate", 0.0, "learning_rate must be finite and > 0"),
        ("learning_rate", float("nan"), "learning_rate must be finite and > 0"),
        ("proximal_mu", -1.0, "proximal_mu must be finite and >= 0"),
    ],
)
def test_bad_hyperparameters_are_refused(field: str, value: float, message: str) -> None:
    x, y = blobs()
    trainer = create_trainer("softmax", num_features=2, num_classes=3)
    kwargs: dict[str, float] = {
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 0.1,
        "proximal_mu": 0.0,
        field: value,
    }
    with pytest.raises(ValueError, match=message):
        trainer.train(
            trainer.init_model(0),
            x,
            y,
            epochs=int(kwargs["epochs"]),
            batch_size=int(kwargs["batch_size"]),
            learning_rate=kwargs["learning_rate"],
            proximal_mu=kwargs["proximal_mu"],
            seed=0,
        )


def test_bad_data_is_refused() -> None:
    x, y = blobs()
    trainer = create_trainer("softmax", num_features=2, num_classes=3)
    w = trainer.init_model(0)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\)"):
        trainer.evaluate(w, x[:, :1], y)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        trainer.evaluate(w, x, y + 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        trainer.evaluate(w, np.full_like(x, np.nan), y)
    with pytest.raises(ValueError, match="y must have shape"):
        trainer.evaluate(w, x, y[:-1])


def test_mismatched_weights_are_refused() -> None:
    x, y = blobs()
    trainer = create_trainer("softmax", num_features=2, num_classes=3)
    w = trainer.init_model(0)
    with pytest.raises(WeightsMismatch, match="must have shape"):
        trainer.evaluate({**w, "dense.bias": np.zeros(4, np.float32)}, x, y)
    with pytest.raises(WeightsMismatch, match="must be float32"):
        trainer.evaluate({**w, "dense.bias": np.zeros(3, np.float64)}, x, y)
    with pytest.raises(WeightsMismatch, match="in this order"):
        trainer.evaluate({"dense.bias": w["dense.bias"], "dense.weight": w["dense.weight"]}, x, y)
