"""Release policy of the privacy manager: what noise a training's aggregate gets, and the charge.

Central DP (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", arXiv:1710.06963): agents clip their update to L2 norm C before
upload; the aggregate is an example-weighted mean, whose sensitivity to one agent is
C * max_k(n_k) / sum_k(n_k); Gaussian noise of std z * sensitivity is added to every
coordinate. The noise multiplier z is calibrated once per training so that ``rounds``
releases meet the level's (epsilon, delta) target. We claim no amplification by
subsampling (sample rate 1): our selection is not Poisson sampling and dropouts
depend on the agents, so the conservative bound is the honest one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from federated_learning.coordination.state import TrainingState
from federated_learning.privacy.accountant import PrivacyAccountant, compute_noise_multiplier
from federated_learning.privacy.levels import PrivacyLevel, privacy_targets
from federated_learning.privacy.mechanisms import add_gaussian_noise, secure_rng
from federated_learning.protocol.messages import AggregateReady, PrivacyLevelName, PrivacyReport
from federated_learning.types import NamedLayers

BUDGET_WARNING_FRACTION = 0.8


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


def local_noise_std(state: TrainingState) -> float | None:
    """Std of the gaussian noise each agent adds under local DP: z * C, with z calibrated for
    ``rounds`` participations at the level's target; None for central DP or level none."""
    target = privacy_targets(PrivacyLevel(state.privacy_level))
    if state.config.privacy_mode != "local" or not target.enabled or state.clip_norm is None:
        return None
    return compute_noise_multiplier(target.epsilon, target.delta, 1.0, state.config.rounds) * state.clip_norm


DEFAULT_ADAPTIVE_INITIAL_CLIP_NORM = 1.0
"""Starting clip norm of adaptive clipping when neither the training nor its level names one."""


def central_noise_multiplier(state: TrainingState) -> float | None:
    """The noise multiplier z central DP calibrates for the training; None without central DP."""
    target = privacy_targets(PrivacyLevel(state.privacy_level))
    if not target.enabled or state.config.privacy_mode != "central":
        return None
    return compute_noise_multiplier(target.epsilon, target.delta, 1.0, state.config.rounds)


def adaptive_count_noise_std(state: TrainingState) -> float | None:
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


def plan_release(state: TrainingState, layers: NamedLayers, ready: AggregateReady,
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
    noise_multiplier = compute_noise_multiplier(target.epsilon, target.delta, 1.0, state.config.rounds)
    if accountant.would_exceed(noise_multiplier, 1.0):
        raise ReleaseRefused(
            f"privacy budget exhausted: epsilon spent {accountant.get_epsilon():.3f} of "
            f"{target.epsilon}; one more release would exceed it")
    spent = accountant.step(noise_multiplier, 1.0)
    clip = state.clip_norm or target.clip_norm
    assert clip is not None
    alerts = []
    if spent >= BUDGET_WARNING_FRACTION * target.epsilon:
        alerts.append(f"privacy budget {spent / target.epsilon:.0%} spent "
                      f"(epsilon {spent:.3f} of {target.epsilon})")
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
    noised = add_gaussian_noise(list(layers.values()), std, rng or secure_rng())
    return ReleasePlan(
        report=PrivacyReport(level=cast(PrivacyLevelName, level), mechanism="gaussian", noise_std=std,
                             epsilon_spent=spent, delta=target.delta,
                             note=f"central gaussian noise std {std:.3g} (z={noise_multiplier:.3f}"
                                  + (f", z_update={update_z:.3f} beside the adaptive clip count"
                                     if count_noise_std is not None else "")
                                  + f", clip {clip:.4g}); epsilon {spent:.3f} of {target.epsilon}"),
        noised_layers=dict(zip(layers, (np.asarray(a, dtype=layers[n].dtype)
                                        for n, a in zip(layers, noised, strict=True)), strict=True)),
        budget_json=json.dumps(accountant.to_dict()),
        alerts=alerts,
    )
