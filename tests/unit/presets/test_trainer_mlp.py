"""One-hidden-layer MLP: backprop against finite differences, init, learning, determinism."""

from collections.abc import Callable

import numpy as np

from federated_learning.presets import create_trainer
from federated_learning.presets.common import Params
from federated_learning.presets.mlp import mlp_loss_and_grad


def central_difference(
    loss: Callable[[Params], float], params: Params, eps: float = 1e-6
) -> Params:
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


def test_mlp_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 4))
    y = rng.integers(0, 3, size=6)
    params = {
        "hidden.weight": rng.standard_normal((4, 5)),
        "hidden.bias": rng.standard_normal(5),
        "output.weight": rng.standard_normal((5, 3)),
        "output.bias": rng.standard_normal(3),
    }
    _, grads = mlp_loss_and_grad(params, x, y)
    expected = central_difference(lambda p: mlp_loss_and_grad(p, x, y)[0], params)
    for name in params:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-5, atol=1e-7)


def test_mlp_init_is_he_scaled_and_seeded() -> None:
    trainer = create_trainer("mlp", num_features=400, num_classes=10, hidden=300)
    w = trainer.init_model(5)
    assert abs(w["hidden.weight"].std() - np.sqrt(2 / 400)) < 0.005
    assert abs(w["output.weight"].std() - np.sqrt(2 / 300)) < 0.01
    np.testing.assert_array_equal(w["hidden.bias"], 0)
    np.testing.assert_array_equal(w["hidden.weight"], trainer.init_model(5)["hidden.weight"])
    assert not np.array_equal(w["hidden.weight"], trainer.init_model(6)["hidden.weight"])


def test_mlp_learns_xor() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(200, 2)).astype(np.float32)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.int64)
    trainer = create_trainer("mlp", num_features=2, num_classes=2, hidden=16)
    _, result = trainer.train(
        trainer.init_model(0), x, y, epochs=200, batch_size=16, learning_rate=0.2, seed=0
    )
    assert result.accuracy >= 0.95


def test_mlp_proximal_term_pulls_toward_global() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    trainer = create_trainer("mlp", num_features=3, num_classes=2, hidden=8)
    start = trainer.init_model(0)
    free, held = (
        trainer.train(
            start, x, y, epochs=5, batch_size=8, learning_rate=0.05, proximal_mu=mu, seed=0
        )[0]
        for mu in (0.0, 10.0)
    )
    for name in start:
        drift_free = np.linalg.norm(free[name] - start[name])
        drift_held = np.linalg.norm(held[name] - start[name])
        assert drift_held < 0.2 * drift_free


def test_mlp_training_is_deterministic_under_seed() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=30)
    trainer = create_trainer("mlp", num_features=3, num_classes=2, hidden=8)
    a, ra = trainer.train(
        trainer.init_model(1), x, y, epochs=3, batch_size=4, learning_rate=0.1, seed=4
    )
    b, rb = trainer.train(
        trainer.init_model(1), x, y, epochs=3, batch_size=4, learning_rate=0.1, seed=4
    )
    assert ra == rb
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
