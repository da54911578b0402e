"""Release policy of the privacy manager: what noise a training's aggregate gets, and the charge.

Central DP (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", arXiv:1710.06963): agents clip their update to L2 norm C before
upload; the aggregate is an example-weighted mean, whose sensitivity to one agent is
C * max_k(n_k) / sum_k(n_k); Gaussian noise of std z * sensitivity is added to every
coordinate. The noise multiplier z is calibrated once per training so that ``rounds``
releases meet the level's (epsilon, delta) target. We claim no amplification by
subsampling (sample rate 1): our selection is not Poisson sampling and dropouts
depend on the agents, so the conservative bound is the honest one.

With ``noise_mechanism: "laplace"`` agents clip in L1 instead, every release is
(epsilon / rounds)-DP with Laplace noise of scale b = L1 sensitivity / (epsilon / rounds),
and the accountant composes them (pure epsilon, or its RDP bound when that is smaller).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np
from numpy.typing import NDArray

from federated_learning.privacy.accountant import PrivacyAccountant, compute_noise_multiplier
from federated_learning.privacy.levels import PrivacyLevel, privacy_targets
from federated_learning.privacy.mechanisms import (
    NormType,
    add_gaussian_noise,
    add_laplace_noise,
    secure_rng,
)
from federated_learning.protocol.messages import (
    AggregateReady,
    PrivacyLevelName,
    PrivacyReport,
    TrainingConfig,
)
from federated_learning.protocol.tensors import is_float
from federated_learning.types import NamedLayers

BUDGET_WARNING_FRACTION = 0.8


class PrivacySettings(Protocol):
    """What a release depends on: the coordinator's state and a training's published view have it."""

    @property
    def config(self) -> TrainingConfig: ...

    @property
    def privacy_level(self) -> str: ...

    @property
    def clip_norm(self) -> float | None: ...

    @property
    def clients_per_round(self) -> int: ...


class ReleaseRefused(RuntimeError):
    """The release would exceed the training's privacy budget; the message says by how much."""


@dataclass
class ReleasePlan:
    report: PrivacyReport
    noised_layers: NamedLayers | None = None
    budget_json: str | None = None
    alerts: list[str] = field(default_factory=list)


def clip_norm_for(level: str, requested: float | None) -> float | None:
    """The clipping bound agents apply: the training's own, else the level's (None without DP)."""
    targets = privacy_targets(PrivacyLevel(level))
    if not targets.enabled:
        return requested
    return requested if requested is not None else targets.clip_norm


LAPLACE_EPSILON_MARGIN = 1e-9
"""Relative margin below epsilon / rounds per Laplace release, so that ``rounds`` releases
sum to at most the target in floating point."""


def clip_norm_type(state: PrivacySettings) -> NormType:
    """The norm updates are clipped in: L1 for the Laplace mechanism, L2 otherwise."""
    return "l1" if state.config.noise_mechanism == "laplace" else "l2"


def laplace_release_epsilon(state: PrivacySettings) -> float:
    """Epsilon of each Laplace release: the level's epsilon shared by ``rounds`` releases."""
    target = privacy_targets(PrivacyLevel(state.privacy_level))
    return target.epsilon / state.config.rounds * (1.0 - LAPLACE_EPSILON_MARGIN)


def _local_dp(state: PrivacySettings) -> bool:
    target = privacy_targets(PrivacyLevel(state.privacy_level))
    return state.config.privacy_mode == "local" and target.enabled and state.clip_norm is not None


def local_noise_std(state: PrivacySettings) -> float | None:
    """Std of the gaussian noise each agent adds under local DP: z * C, with z calibrated for
    ``rounds`` participations at the level's target; None for central DP, level none or Laplace."""
    if not _local_dp(state) or state.config.noise_mechanism != "gaussian":
        return None
    assert state.clip_norm is not None
    target = privacy_targets(PrivacyLevel(state.privacy_level))
    return compute_noise_multiplier(target.epsilon, target.delta, 1.0, state.config.rounds) * state.clip_norm


def local_laplace_scale(state: PrivacySettings) -> float | None:
    """Scale of the Laplace noise each agent adds under local DP with the Laplace mechanism:
    C (its L1 sensitivity) / (epsilon / rounds); None otherwise."""
    if not _local_dp(state) or state.config.noise_mechanism != "laplace":
        return None
    assert state.clip_norm is not None
    return state.clip_norm / laplace_release_epsilon(state)


DEFAULT_ADAPTIVE_INITIAL_CLIP_NORM = 1.0
"""Starting clip norm of adaptive clipping when neither the training nor its level names one."""


def central_noise_multiplier(state: PrivacySettings) -> float | None:
    """The noise multiplier z central DP calibrates for the training; None without central DP."""
    target = privacy_targets(PrivacyLevel(state.privacy_level))
    if not target.enabled or state.config.privacy_mode != "central":
        return None
    return compute_noise_multiplier(target.epsilon, target.delta, 1.0, state.config.rounds)


def adaptive_count_noise_std(state: PrivacySettings) -> float | None:
    """Std of the noise on adaptive clipping's count of unclipped updates; None when the clip is fixed.

    The training's value, else clients_per_round / 20 (Andrew et al.'s choice), raised to the
    noise multiplier z under central DP so that the update noise stays within 16% of z's.
    """
    adaptive = state.config.adaptive_clipping
    if adaptive is None:
        return None
    if adaptive.count_noise_std is not None:
        return adaptive.count_noise_std
    default = state.clients_per_round / 20
    z = central_noise_multiplier(state)
    return default if z is None else max(default, z)


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """The update's noise multiplier z_u when a count with noise std sigma_b is released too, such
    that both together are as private as one Gaussian release with ``noise_multiplier`` z:
    z_u = (z**-2 - (2 sigma_b)**-2) ** -1/2 (Andrew et al. 2021, Theorem 1)."""
    if not 2 * count_noise_std > noise_multiplier:
        raise ValueError(f"adaptive clipping's count noise std {count_noise_std:g} must exceed half the noise "
                         f"multiplier ({noise_multiplier / 2:g}) for the count to fit in the privacy budget")
    return float((noise_multiplier**-2 - (2 * count_noise_std) ** -2) ** -0.5)


def plan_release(state: PrivacySettings, layers: NamedLayers, ready: AggregateReady,
                 budget_json: str | None, rng: np.random.Generator | None = None) -> ReleasePlan:
    """Decide the release of ``layers`` (the aggregate of ``ready``) for ``state``'s training."""
    level = state.privacy_level
    if level == "none":
        return ReleasePlan(PrivacyReport(
            level="none", mechanism="none",
            note="privacy level 'none': released without noise, no budget charged"))
    target = privacy_targets(PrivacyLevel(level))
    if budget_json is None:
        accountant = PrivacyAccountant(target.epsilon, target.delta)
    else:
        accountant = PrivacyAccountant.from_dict(json.loads(budget_json))
    laplace = state.config.noise_mechanism == "laplace"
    if laplace:
        release_epsilon = laplace_release_epsilon(state)
        exceeds = accountant.would_exceed_laplace(release_epsilon)
    else:
        noise_multiplier = compute_noise_multiplier(target.epsilon, target.delta, 1.0, state.config.rounds)
        exceeds = accountant.would_exceed(noise_multiplier, 1.0)
    if exceeds:
        raise ReleaseRefused(
            f"privacy budget exhausted: epsilon spent {accountant.get_epsilon():.3f} of "
            f"{target.epsilon}; one more release would exceed it")
    spent = accountant.step_laplace(release_epsilon) if laplace else accountant.step(noise_multiplier, 1.0)
    clip = state.clip_norm or target.clip_norm
    assert clip is not None
    alerts = []
    if spent >= BUDGET_WARNING_FRACTION * target.epsilon:
        alerts.append(f"privacy budget {spent / target.epsilon:.0%} spent "
                      f"(epsilon {spent:.3f} of {target.epsilon})")
    if laplace:
        return _laplace_release(state, layers, ready, accountant, spent, clip, alerts, rng)
    if state.config.privacy_mode == "local":
        # The agents already noised their own updates; each release is one more use of each
        # participant's mechanism, so charging one step per release bounds every agent's spend.
        return ReleasePlan(
            report=PrivacyReport(level=cast(PrivacyLevelName, level), mechanism="gaussian-local",
                                 noise_std=local_noise_std(state) or 0.0, epsilon_spent=spent,
                                 delta=target.delta,
                                 note=f"local DP: each agent added gaussian noise std "
                                      f"{local_noise_std(state):.3g} (z={noise_multiplier:.3f}, clip {clip}); "
                                      f"epsilon {spent:.3f} of {target.epsilon} per agent"),
            budget_json=json.dumps(accountant.to_dict()), alerts=alerts)
    # One agent moves the example-weighted mean by at most clip * n_k / sum(n).
    sensitivity = clip * ready.max_client_examples / max(ready.num_examples, 1)
    count_noise_std = adaptive_count_noise_std(state)
    update_z = noise_multiplier if count_noise_std is None else update_noise_multiplier(noise_multiplier,
                                                                                        count_noise_std)
    std = update_z * sensitivity
    noised_layers = noise_float_layers(layers, lambda floats: add_gaussian_noise(floats, std, rng or secure_rng()))
    return ReleasePlan(
        report=PrivacyReport(level=cast(PrivacyLevelName, level), mechanism="gaussian", noise_std=std,
                             epsilon_spent=spent, delta=target.delta,
                             note=f"central gaussian noise std {std:.3g} (z={noise_multiplier:.3f}"
                                  + (f", z_update={update_z:.3f} beside the adaptive clip count"
                                     if count_noise_std is not None else "")
                                  + f", clip {clip:.4g}); epsilon {spent:.3f} of {target.epsilon}"),
        noised_layers=noised_layers,
        budget_json=json.dumps(accountant.to_dict()),
        alerts=alerts,
    )


def _laplace_release(state: PrivacySettings, layers: NamedLayers, ready: AggregateReady,
                     accountant: PrivacyAccountant, spent: float, clip: float, alerts: list[str],
                     rng: np.random.Generator | None) -> ReleasePlan:
    """The Laplace mechanism's release (already charged): local DP reports the agents' noise;
    central DP adds Laplace noise of scale L1 sensitivity / release epsilon to the aggregate."""
    level = cast(PrivacyLevelName, state.privacy_level)
    target = privacy_targets(PrivacyLevel(state.privacy_level))
    release_epsilon = laplace_release_epsilon(state)
    budget_json = json.dumps(accountant.to_dict())
    if state.config.privacy_mode == "local":
        scale = local_laplace_scale(state) or 0.0
        return ReleasePlan(
            report=PrivacyReport(level=level, mechanism="laplace-local", noise_std=math.sqrt(2) * scale,
                                 epsilon_spent=spent, delta=target.delta,
                                 note=f"local DP: each agent added Laplace noise of scale {scale:.3g} "
                                      f"(epsilon {release_epsilon:.3g} per release, L1 clip {clip}); "
                                      f"epsilon {spent:.3f} of {target.epsilon} per agent"),
            budget_json=budget_json, alerts=alerts)
    # One agent moves the example-weighted mean by at most clip * n_k / sum(n) in L1.
    sensitivity = clip * ready.max_client_examples / max(ready.num_examples, 1)
    scale = sensitivity / release_epsilon
    noised_layers = noise_float_layers(layers, lambda floats: add_laplace_noise(floats, scale, rng or secure_rng()))
    return ReleasePlan(
        report=PrivacyReport(level=level, mechanism="laplace", noise_std=math.sqrt(2) * scale,
                             epsilon_spent=spent, delta=target.delta,
                             note=f"central Laplace noise of scale {scale:.3g} (epsilon {release_epsilon:.3g} "
                                  f"per release, L1 clip {clip:.4g}); epsilon {spent:.3f} of {target.epsilon}"),
        noised_layers=noised_layers,
        budget_json=budget_json, alerts=alerts)


def noise_float_layers(layers: NamedLayers,
                       add_noise: Callable[[list[NDArray[np.floating]]], list[NDArray[np.floating]]]) -> NamedLayers:
    """``layers`` with noise added to the float layers (each kept in its dtype); integer layers,
    which the aggregate carries from the global model under DP, pass unchanged."""
    trained = [name for name, layer in layers.items() if is_float(layer.dtype.name)]
    noised = dict(zip(trained, add_noise([layers[name] for name in trained]), strict=True))
    return {name: np.asarray(noised[name]).astype(layer.dtype, copy=False) if name in noised else layer
            for name, layer in layers.items()}
