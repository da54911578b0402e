"""Noise mechanisms on model updates: L2 clipping, adaptive clipping, Gaussian and Laplace noise.

An update is a list of layers (float arrays) treated as one vector: clipping bounds the L2
norm of all coordinates together, which is the sensitivity the accountant assumes
(`PrivacyAccountant.step(noise_multiplier, ...)` with noise std = noise_multiplier * C).

Central DP (DP-FedAvg, McMahan et al., "Learning Differentially Private Recurrent
Language Models", 2018, arXiv:1710.06963): agents clip to C, the server averages n
updates and adds N(0, (z C / n)^2) per coordinate (`central_noise_std`). Local DP: each
agent adds N(0, (z C)^2) to its own clipped update before upload (`privatize_local`).

Adaptive clipping follows Andrew, Thakkar, McMahan and Ramaswamy, "Differentially
Private Learning with Adaptive Clipping", NeurIPS 2021, arXiv:1905.03871.

Randomness: every function takes a `numpy.random.Generator`. Tests pass a seeded one; in
production use `secure_rng()`, a generator seeded from os.urandom so that nobody can
predict or replay the noise. PCG64 is not a cryptographic generator: the seed must stay
secret on the machine that adds the noise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from federated_learning.privacy.layers import Layers
from federated_learning.protocol.tensors import is_float

_SEED_BYTES = 32


def secure_rng() -> np.random.Generator:
    """A PCG64 generator seeded with 256 bits from os.urandom (for production noise)."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(_SEED_BYTES), "big")))


def l2_norm(layers: Layers) -> float:
    """L2 norm of all layers' coordinates as one vector, accumulated in float64."""
    total = 0.0
    for layer in layers:
        flat = np.asarray(layer).astype(np.float64, copy=False).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_l2(
    update: Layers, max_norm: float
) -> tuple[list[NDArray[np.floating]], float]:
    """Scale an update so that its global L2 norm is at most max_norm.

    update' = update * min(1, max_norm / ||update||_2), the norm taken over all layers
    as one vector (Abadi et al. 2016, arXiv:1607.00133, Alg. 1, per example; here per agent).

    Args:
        update: layers of any float dtype and shape.
        max_norm: clip norm C > 0, in the update's units.

    Returns:
        (clipped layers, new arrays of the input dtypes and shapes; pre-clip norm).
    """
    return _scale_to(update, max_norm, l2_norm(update))


def _scale_to(update: Layers, max_norm: float, norm: float) -> tuple[list[NDArray[np.floating]], float]:
    """``update`` scaled by min(1, max_norm / norm), in each layer's dtype; and ``norm``."""
    if not (max_norm > 0.0 and math.isfinite(max_norm)):
        raise ValueError(f"clip norm must be finite and > 0; got {max_norm}")
    if not math.isfinite(norm):
        raise ValueError(f"update norm must be finite; got {norm}")
    factor = min(1.0, max_norm / norm) if norm > 0.0 else 1.0
    clipped = [np.asarray(layer) * np.asarray(factor, dtype=np.asarray(layer).dtype)
               for layer in update]
    return clipped, norm


NormType = Literal["l2", "l1"]
"""Which norm updates are clipped in: L2 for the Gaussian mechanism, L1 for the Laplace one."""


def l1_norm(layers: Layers) -> float:
    """L1 norm of all layers' coordinates as one vector, accumulated in float64."""
    return float(sum(np.abs(np.asarray(layer, dtype=np.float64)).sum() for layer in layers))


def clip_to_norm(update: Layers, max_norm: float, norm_type: NormType = "l2"
                 ) -> tuple[list[NDArray[np.floating]], float]:
    """`clip_l2`, or the same scaling by the global L1 norm (the Laplace mechanism's
    sensitivity is in L1). Returns (clipped layers, pre-clip norm)."""
    return _scale_to(update, max_norm, l2_norm(update) if norm_type == "l2" else l1_norm(update))


def _check_std(value: float, name: str) -> None:
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and >= 0; got {value}")


def _noise_dtype(layer: NDArray[np.floating]) -> type[np.floating]:
    return np.float32 if layer.dtype == np.float32 else np.float64


def add_gaussian_noise(
    layers: Layers, std: float, rng: np.random.Generator
) -> list[NDArray[np.floating]]:
    """Add i.i.d. N(0, std^2) to every coordinate; new arrays of the input dtypes and shapes."""
    _check_std(std, "noise std")
    noisy: list[NDArray[np.floating]] = []
    for layer in layers:
        array = np.asarray(layer)
        dtype = _noise_dtype(array)
        noise = rng.standard_normal(array.shape, dtype=dtype) * dtype(std)
        noisy.append((array + noise).astype(array.dtype, copy=False))
    return noisy


def add_laplace_noise(
    layers: Layers, scale: float, rng: np.random.Generator
) -> list[NDArray[np.floating]]:
    """Add i.i.d. Laplace(0, scale) (density exp(-|x|/scale) / (2 scale)) to every coordinate.

    The Laplace mechanism is epsilon-DP with scale = L1 sensitivity / epsilon
    (`laplace_scale`); the noise std is sqrt(2) * scale.
    """
    _check_std(scale, "Laplace scale")
    noisy: list[NDArray[np.floating]] = []
    for layer in layers:
        array = np.asarray(layer)
        noise = rng.laplace(0.0, scale, array.shape)
        noisy.append((array + noise).astype(array.dtype, copy=False))
    return noisy


def laplace_scale(l1_sensitivity: float, epsilon: float) -> float:
    """Laplace scale b = L1 sensitivity / epsilon of an epsilon-DP release."""
    if not (l1_sensitivity > 0.0 and math.isfinite(l1_sensitivity)):
        raise ValueError(f"L1 sensitivity must be finite and > 0; got {l1_sensitivity}")
    if not (epsilon > 0.0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0; got {epsilon}")
    return l1_sensitivity / epsilon


def central_noise_std(clip_norm: float, noise_multiplier: float, num_updates: int) -> float:
    """Std z * C / n of the Gaussian noise on the mean of n updates clipped to C.

    Adding or removing one agent moves the sum by at most C, so the mean (divided by the
    fixed, public n) by C / n; noise multiplier z is relative to that sensitivity.
    """
    if not (clip_norm > 0.0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip norm must be finite and > 0; got {clip_norm}")
    _check_std(noise_multiplier, "noise multiplier")
    if num_updates < 1:
        raise ValueError(f"number of updates must be >= 1; got {num_updates}")
    return noise_multiplier * clip_norm / num_updates


def local_noise_std(clip_norm: float, noise_multiplier: float) -> float:
    """Std z * C of the Gaussian noise one agent adds to its own update clipped to C."""
    return central_noise_std(clip_norm, noise_multiplier, 1)


def privatize_local(
    update: Layers, clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[list[NDArray[np.floating]], float]:
    """Local DP for one agent: clip to C, add N(0, (z C)^2); returns (layers, pre-clip norm)."""
    clipped, norm = clip_l2(update, clip_norm)
    return add_gaussian_noise(clipped, local_noise_std(clip_norm, noise_multiplier), rng), norm


def update_noise_multiplier(total_noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier left for the update when adaptive clipping also releases a count.

    Andrew et al. 2021, Sec. 3: releasing the noisy clipped-count with std sigma_b next to
    the update with multiplier z_delta costs as one Gaussian query with
    z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2); so z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).
    Account for the pair with `total_noise_multiplier`.
    """
    if not (total_noise_multiplier > 0.0 and math.isfinite(total_noise_multiplier)):
        raise ValueError(f"noise multiplier must be finite and > 0; got {total_noise_multiplier}")
    if not 2.0 * count_noise_std > total_noise_multiplier:
        raise ValueError(
            f"count noise std must exceed half the noise multiplier "
            f"({total_noise_multiplier / 2}); got {count_noise_std}"
        )
    return float((total_noise_multiplier**-2 - (2.0 * count_noise_std) ** -2) ** -0.5)


class AdaptiveClipper:
    """Clip norm that tracks a quantile of the update norms (Andrew et al. 2021, Alg. 1).

    Each round, with b_i = 1[||update_i|| <= C] for the m participating agents:
        b = (sum_i b_i + N(0, count_noise_std^2)) / m
        C <- C * exp(-learning_rate * (b - target_quantile))
    The geometric step converges to the target quantile of the norm distribution in
    log scale, whatever the model's units.
    """

    def __init__(
        self, initial_norm: float, target_quantile: float, learning_rate: float,
        count_noise_std: float, rng: np.random.Generator | None = None,
    ) -> None:
        if not (initial_norm > 0.0 and math.isfinite(initial_norm)):
            raise ValueError(f"initial clip norm must be finite and > 0; got {initial_norm}")
        if not 0.0 < target_quantile < 1.0:
            raise ValueError(f"target quantile must be in (0, 1); got {target_quantile}")
        if not (learning_rate > 0.0 and math.isfinite(learning_rate)):
            raise ValueError(f"learning rate must be finite and > 0; got {learning_rate}")
        _check_std(count_noise_std, "count noise std")
        self.clip_norm = float(initial_norm)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_noise_std = float(count_noise_std)
        self._rng = rng if rng is not None else secure_rng()

    def update(self, update_norms: Sequence[float] | NDArray[np.floating]) -> float:
        """Move C given the pre-clip norms of this round's updates; returns the new C."""
        norms = np.asarray(update_norms, dtype=np.float64)
        return self.update_from_count(int(np.count_nonzero(norms <= self.clip_norm)), norms.size)

    def update_from_count(self, num_unclipped: int, num_updates: int) -> float:
        """Move C given how many of num_updates updates had norm <= C (e.g. a secure sum)."""
        if num_updates < 1:
            raise ValueError(f"number of updates must be >= 1; got {num_updates}")
        if not 0 <= num_unclipped <= num_updates:
            raise ValueError(
                f"unclipped count must be in [0, {num_updates}]; got {num_unclipped}"
            )
        noisy_count = num_unclipped + self._rng.normal(0.0, self.count_noise_std)
        fraction = noisy_count / num_updates
        self.clip_norm *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.clip_norm


def clip_update(global_layers: Mapping[str, NDArray[np.floating]], local: Mapping[str, NDArray[np.floating]],
                max_norm: float, norm_type: NormType = "l2") -> dict[str, NDArray[np.floating]]:
    """The local model whose update ``local - global`` is clipped to ``max_norm`` (L2 or L1)."""
    return clip_update_with_norm(global_layers, local, max_norm, norm_type)[0]


def clip_update_with_norm(global_layers: Mapping[str, NDArray[np.floating]],
                          local: Mapping[str, NDArray[np.floating]],
                          max_norm: float, norm_type: NormType = "l2") -> tuple[dict[str, NDArray[np.floating]], float]:
    """`clip_update`, and the update's norm before clipping. Only float layers are an update:
    integer layers (counters) are returned as they are."""
    trained = [name for name in local if is_float(local[name].dtype.name)]
    deltas = [local[name].astype(np.float64) - global_layers[name] for name in trained]
    clipped, norm = clip_to_norm(deltas, max_norm, norm_type)
    result = dict(local)
    for name, delta in zip(trained, clipped, strict=True):
        result[name] = (global_layers[name] + delta).astype(local[name].dtype)
    return result, float(norm)
