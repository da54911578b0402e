"""Anomaly statistics: suspicious client updates and sudden jumps in a metric series.

Robust z-score (the "modified z-score" of Iglewicz and Hoaglin, "How to Detect and Handle
Outliers", 1993, who recommend flagging |z| > 3.5):

    z_i = (x_i - median(x)) / (1.4826 * MAD),     MAD = median_i |x_i - median(x)|

1.4826 = 1 / Phi^-1(3/4) makes 1.4826 * MAD estimate the standard deviation of normal data.
When more than half the values are equal, MAD is 0; we then fall back to the mean absolute
deviation around the median, scaled by sqrt(pi/2) = 1.2533 (its normal-consistency factor),
and if that is 0 too (all values equal) every score is 0.

An update is judged by its delta from the global model, delta_k = update_k - global:
its L2 norm (a boosted or scaled update stands out) and its cosine similarity to the
coordinate-wise median delta, the consensus direction (a sign-flipped or otherwise
adversarial update points away from it; cf. Fung, Yoon and Beschastnikh, "The Limitations
of Federated Learning in Sybil Settings", 2018, arXiv:1808.04866, on cosine similarity of
client updates). An agent is flagged when |norm_z| > threshold or cosine_z < -threshold.

Each statistic's scale has a floor, because honest updates can agree more closely than the
differences that matter: ten honest cosines at 0.94 +- 0.005 would otherwise turn one honest
0.885 into z = -6. The floors are ``COSINE_MIN_SCALE`` for cosines (bounded in [-1, 1]) and
``NORM_MIN_RELATIVE_SCALE`` times the median norm for norms. With fewer than
``MIN_UPDATES_FOR_SCORES`` finite updates a median and its spread say nothing, and every
score is 0.

The floors are calibrated on honest non-IID rounds (the demo's Dirichlet-0.5 split) so that a
clean run flags no update, while the attacks of docs/robustness.md are still flagged:
``scripts/calibrate-anomaly.py`` measures both rates, and docs/robustness.md records them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from federated_learning.monitoring.alerts import Condition
from federated_learning.monitoring.metrics import MetricType, TrainingMetric
from federated_learning.protocol.messages import Severity
from federated_learning.types import AgentId, RoundNumber
from federated_learning.versioning.compare import cosine_from_moments

MAD_TO_SIGMA = 1.4826
MEAN_AD_TO_SIGMA = 1.2533
"""sqrt(pi / 2): sigma / E|X - mu| for normal X."""
UPDATE_Z_THRESHOLD = 3.5
JUMP_Z_THRESHOLD = 3.0
JUMP_WINDOW = 5
JUMP_HISTORY = 30
"""Most recent rounds of a metric the monitor's trend check looks at."""
JUMP_MIN_RESIDUALS = 5
"""Fewer residuals than this (rounds beyond the first window) say nothing about a trend."""
JUMP_MIN_RELATIVE_SCALE = 0.02
"""Residuals within this fraction of the series' median magnitude carry no signal: on a plateau
of equal values the scale is 0 and any wiggle would otherwise be a jump."""
JUMP_METRICS = (MetricType.ACCURACY, MetricType.LOSS)
"""The metric types the monitor checks for jumps when a round completes."""
COSINE_MIN_SCALE = 0.25
"""Cosines closer than this to the median carry no signal. Honest agents with label-skewed
(non-IID) data point well away from the median update (cosines down to about -0.5 on the
Dirichlet-0.5 demo), so a tighter floor flags them. On such data a sign-flipped update points
no further from the median than honest ones do (scripts/calibrate-anomaly.py): there the norm
test does the work; with similar (IID) data honest cosines cluster and a flipped one stands out."""
NORM_MIN_RELATIVE_SCALE = 0.8
"""Norm deviations within this fraction of the median norm carry no signal, so an update is
flagged for its norm only beyond (1 + UPDATE_Z_THRESHOLD * 0.8) = 3.8 times the median at the
least. On label-skewed data honest norms spread widely (local datasets differ tenfold in size,
and so do the local SGD steps): on the Dirichlet-0.5 demo they reach 3.5 times the round's
median, and in rounds whose norms happen to agree closely the MAD alone made such an agent
z = 8 (0.05 flagged an honest update in one round of five). The attacks' updates sit at a
median 3.9 (sign_flip), 5.1 (label_flip) and 12.5 (gaussian) times it
(scripts/calibrate-anomaly.py). The lower side cannot fire at this floor: a small update has
little pull on the aggregate anyway."""
MIN_UPDATES_FOR_SCORES = 5
ANOMALY_MAX_VALUES = 50_000_000
"""Update anomaly scores are skipped above this many values (K x d) to keep rounds fast."""


def scores_updates(updates: int, values: int) -> bool:
    """Whether a job of ``updates`` updates of ``values`` trained values each gets anomaly scores:
    enough updates for a median, and at most ``ANOMALY_MAX_VALUES`` values in all."""
    return MIN_UPDATES_FOR_SCORES <= updates and updates * values <= ANOMALY_MAX_VALUES


CHUNK_ELEMENTS = 1 << 16
"""Float64 elements per column block when reducing the stack of deltas."""

REASON_NORM = "norm_outlier"
REASON_DIRECTION = "opposes_consensus"
REASON_NON_FINITE = "non_finite"


def robust_scale(values: NDArray[np.float64], center: float) -> float:
    """1.4826 * MAD, else 1.2533 * mean |x - center| when MAD is 0 (0.0 when that is 0 too)."""
    deviations = np.abs(values - center)
    mad = float(np.median(deviations))
    if mad > 0.0:
        return MAD_TO_SIGMA * mad
    return MEAN_AD_TO_SIGMA * float(np.mean(deviations))


def robust_z_scores(values: ArrayLike, min_scale: float = 0.0) -> NDArray[np.float64]:
    """(x - median) / max(robust_scale, min_scale), shape (n,) float64; zeros when that is 0."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return x
    if not np.isfinite(x).all():
        raise ValueError("robust z-scores need finite values; got NaN or Inf")
    center = float(np.median(x))
    scale = max(robust_scale(x, center), min_scale)
    if scale == 0.0:
        return np.zeros_like(x)
    return (x - center) / scale


def update_z_scores(norms: NDArray[np.float64],
                    cosines: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Robust z of norms and cosines with their scale floors; zeros below ``MIN_UPDATES_FOR_SCORES``."""
    if norms.size < MIN_UPDATES_FOR_SCORES:
        return np.zeros_like(norms), np.zeros_like(cosines)
    norm_floor = NORM_MIN_RELATIVE_SCALE * float(np.median(norms))
    return robust_z_scores(norms, norm_floor), robust_z_scores(cosines, COSINE_MIN_SCALE)


@dataclass(frozen=True)
class UpdateFlag:
    """One agent's update statistics; ``reasons`` is empty when nothing looks wrong."""

    agent_id: AgentId
    norm: float
    norm_z: float
    cosine: float
    cosine_z: float
    reasons: tuple[str, ...] = ()

    @property
    def suspicious(self) -> bool:
        return bool(self.reasons)


def _check_layout(global_layers: Sequence[NDArray[np.floating]],
                  updates: Sequence[Sequence[NDArray[np.floating]]],
                  agent_ids: Sequence[AgentId]) -> None:
    if len(updates) != len(agent_ids):
        raise ValueError(f"got {len(updates)} updates for {len(agent_ids)} agent ids")
    if len(set(agent_ids)) != len(agent_ids):
        raise ValueError(f"agent ids must be unique; got {list(agent_ids)}")
    shapes = [layer.shape for layer in global_layers]
    for agent_id, update in zip(agent_ids, updates, strict=True):
        if [layer.shape for layer in update] != shapes:
            raise ValueError(f"agent {agent_id}'s update has layer shapes "
                             f"{[layer.shape for layer in update]}; the global model has {shapes}")


def stack_deltas(global_layers: Sequence[NDArray[np.floating]],
                 updates: Sequence[Sequence[NDArray[np.floating]]]) -> NDArray[np.float32]:
    """Row k is update_k - global, all layers flattened: shape (K, d), float32."""
    sizes = [layer.size for layer in global_layers]
    stack = np.empty((len(updates), sum(sizes)), dtype=np.float32)
    for row, update in zip(stack, updates, strict=True):
        offset = 0
        for size, layer, base in zip(sizes, update, global_layers, strict=True):
            np.subtract(layer.reshape(-1), base.reshape(-1), out=row[offset:offset + size],
                        casting="same_kind")
            offset += size
    return stack


def norms_and_median_cosines(
        stack: NDArray[np.float32]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """L2 norm of each row and its cosine to the coordinate-wise median row, both (K,) float64.

    Works over column blocks so the median's sort copy and the float64 casts are bounded by
    ``CHUNK_ELEMENTS``; the (K, d) float32 stack itself is the only full-size array.
    """
    rows, columns = stack.shape
    block = max(1, CHUNK_ELEMENTS // max(rows, 1))
    squares = np.zeros(rows, dtype=np.float64)
    dots = np.zeros(rows, dtype=np.float64)
    median_square = 0.0
    for start in range(0, columns, block):
        part = stack[:, start:start + block].astype(np.float64)
        median = np.median(part, axis=0)
        squares += np.einsum("ij,ij->i", part, part)
        dots += part @ median
        median_square += float(median @ median)
    cosines = np.array([cosine_from_moments(float(sq), median_square, float(dot))
                        for sq, dot in zip(squares, dots, strict=True)], dtype=np.float64)
    return np.sqrt(squares), cosines


def _reasons(norm_z: float, cosine_z: float, z_threshold: float) -> tuple[str, ...]:
    reasons = []
    if abs(norm_z) > z_threshold:
        reasons.append(REASON_NORM)
    if cosine_z < -z_threshold:
        reasons.append(REASON_DIRECTION)
    return tuple(reasons)


def _is_finite(update: Sequence[NDArray[np.floating]]) -> bool:
    return all(bool(np.isfinite(layer).all()) for layer in update)


def score_updates(global_layers: Sequence[NDArray[np.floating]],
                  updates: Sequence[Sequence[NDArray[np.floating]]], agent_ids: Sequence[AgentId],
                  z_threshold: float = UPDATE_Z_THRESHOLD) -> list[UpdateFlag]:
    """Statistics for every agent, in input order; see the module docstring.

    Memory: one (K, d) float32 stack of the deltas (K updates of d parameters) plus
    column-block temporaries; fine for this monitoring path at modest sizes (100 agents
    x 1M parameters is 400 MB), not for very large models.
    Updates holding NaN or Inf are left out of the statistics and flagged ``non_finite``.
    """
    _check_layout(global_layers, updates, agent_ids)
    finite = [_is_finite(update) for update in updates]
    kept = [update for update, ok in zip(updates, finite, strict=True) if ok]
    norms = cosines = norm_z = cosine_z = np.empty(0, dtype=np.float64)
    if kept:
        norms, cosines = norms_and_median_cosines(stack_deltas(global_layers, kept))
        norm_z, cosine_z = update_z_scores(norms, cosines)
    flags, j = [], 0
    for agent_id, ok in zip(agent_ids, finite, strict=True):
        if not ok:
            flags.append(UpdateFlag(agent_id, math.nan, math.nan, math.nan, math.nan,
                                    (REASON_NON_FINITE,)))
            continue
        nz, cz = float(norm_z[j]), float(cosine_z[j])
        flags.append(UpdateFlag(agent_id, float(norms[j]), nz, float(cosines[j]), cz,
                                _reasons(nz, cz, z_threshold)))
        j += 1
    return flags


def flag_suspicious_updates(global_layers: list[NDArray[np.floating]],
                            updates: list[list[NDArray[np.floating]]], agent_ids: list[AgentId],
                            z_threshold: float = UPDATE_Z_THRESHOLD) -> list[UpdateFlag]:
    """The agents whose update has |norm_z| > z_threshold or cosine_z < -z_threshold."""
    if z_threshold <= 0:
        raise ValueError(f"z_threshold must be > 0; got {z_threshold}")
    scores = score_updates(global_layers, updates, agent_ids, z_threshold)
    return [flag for flag in scores if flag.suspicious]


def trend_residuals(series: Sequence[float], window: int) -> NDArray[np.float64]:
    """r_i = x_i - median(x_{i-window} .. x_{i-1}) for i = window .. n-1."""
    x = np.asarray(series, dtype=np.float64)
    return np.array([x[i] - float(np.median(x[i - window:i])) for i in range(window, x.size)],
                    dtype=np.float64)


def metric_jumps(series: list[float], window: int = JUMP_WINDOW,
                 z_threshold: float = JUMP_Z_THRESHOLD, min_scale: float = 0.0) -> list[int]:
    """Indices i whose value jumps against its recent trend.

    The residual r_i = x_i - median of the ``window`` previous values removes the level and a
    steady trend; index i is a jump when the robust z-score of r_i among all residuals, with
    the residuals' scale at least ``min_scale``, exceeds ``z_threshold`` in absolute value. The
    first ``window`` values have no full window and are never reported.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    if z_threshold <= 0:
        raise ValueError(f"z_threshold must be > 0; got {z_threshold}")
    if min_scale < 0:
        raise ValueError(f"min_scale must be >= 0; got {min_scale}")
    if not all(math.isfinite(v) for v in series):
        raise ValueError("metric series must be finite; got NaN or Inf")
    scores = robust_z_scores(trend_residuals(series, window), min_scale)
    return [window + int(j) for j in np.flatnonzero(np.abs(scores) > z_threshold)]


def metric_jump_conditions(training_id: str, metric: str, points: Iterable[tuple[RoundNumber, float]],
                           round_number: RoundNumber, window: int = JUMP_WINDOW,
                           z_threshold: float = JUMP_Z_THRESHOLD) -> list[Condition]:
    """A ``metric_jump`` warning when ``metric``'s value in ``round_number`` jumps against its trend.

    ``points`` are (round, value) pairs; the latest value of a round wins and the last
    ``JUMP_HISTORY`` rounds are judged by :func:`metric_jumps`, with a scale floor of
    ``JUMP_MIN_RELATIVE_SCALE`` times their median magnitude. Nothing is reported with fewer
    than ``window + JUMP_MIN_RESIDUALS`` rounds, or when ``round_number`` is not among them.
    The key is per training and metric, so a jump is one alert until acknowledged.
    """
    by_round = dict(points)
    rounds = sorted(by_round)[-JUMP_HISTORY:]
    if len(rounds) < window + JUMP_MIN_RESIDUALS or round_number not in rounds:
        return []
    values = [by_round[r] for r in rounds]
    floor = JUMP_MIN_RELATIVE_SCALE * float(np.median(np.abs(values)))
    at = rounds.index(round_number)
    if at not in metric_jumps(values, window, z_threshold, floor):
        return []
    trend = float(np.median(values[at - window:at]))
    return [Condition(
        key=f"metric_jump:{training_id}:{metric}", rule="metric_jump", severity=Severity.WARNING,
        training_id=training_id,
        message=f"training {training_id}: {metric} {values[at]:.4g} in round {round_number} jumped "
                f"against its recent trend (median {trend:.4g} over the previous {window} rounds)",
        action=f"look at round {round_number}'s participants and anomaly flags (one bad update can move "
               "the model at once); compare the round's version with its parent on the dashboard, "
               "and roll back if the next rounds do not recover",
    )]


def series_jump_conditions(training_id: str, series: Iterable[TrainingMetric], round_number: RoundNumber,
                           metrics: Sequence[MetricType] = JUMP_METRICS) -> list[Condition]:
    """:func:`metric_jump_conditions` for each of ``metrics`` in a training's recorded series."""
    recorded = list(series)
    return [condition for metric in metrics
            for condition in metric_jump_conditions(
                training_id, metric.value,
                [(m.round_number, m.value) for m in recorded if m.metric_type is metric], round_number)]


def _describe(flag: UpdateFlag, round_number: RoundNumber) -> str:
    where = f"agent {flag.agent_id}'s update in round {round_number}"
    if REASON_NON_FINITE in flag.reasons:
        return f"{where} holds NaN or Inf values"
    return (f"{where} looks suspicious ({', '.join(flag.reasons)}): norm {flag.norm:.4g} "
            f"(robust z {flag.norm_z:+.1f}), cosine to the median update {flag.cosine:+.3f} "
            f"(robust z {flag.cosine_z:+.1f})")


def anomaly_conditions(flags: Sequence[UpdateFlag], training_id: str,
                       round_number: RoundNumber) -> list[Condition]:
    """A ``suspicious_update`` warning per flagged agent, keyed by training and agent."""
    return [
        Condition(
            key=f"suspicious_update:{training_id}:{flag.agent_id}", rule="suspicious_update",
            severity=Severity.WARNING, training_id=training_id,
            message=_describe(flag, round_number),
            action=f"check agent {flag.agent_id} (its data, software version and credentials); if "
                   "its updates stay suspicious, switch the training to a robust rule (median, "
                   "trimmed_mean, krum or bulyan) or remove the agent",
        )
        for flag in flags if flag.suspicious
    ]


def score_slabs(global_layers: Sequence[NDArray[np.floating]], slabs: Sequence[NDArray[np.floating]],
                median_layers: Sequence[NDArray[np.floating]], agent_ids: Sequence[AgentId],
                z_threshold: float = UPDATE_Z_THRESHOLD) -> list[UpdateFlag]:
    """:func:`score_updates` from the aggregator's (K, d_i) slabs, without stacking deltas.

    ``median_layers`` is the coordinate-wise median model (the median of the deltas is the
    median of the models minus the global model). Extra memory: O(d_i) float64 per layer.
    """
    rows = [[slab[k] for slab in slabs] for k in range(len(agent_ids))]
    return score_rows(global_layers, rows, median_layers, agent_ids, z_threshold)


def score_rows(global_layers: Sequence[NDArray[np.floating]],
               updates: Sequence[Sequence[NDArray[np.generic]]],
               median_layers: Sequence[NDArray[np.floating]], agent_ids: Sequence[AgentId],
               z_threshold: float = UPDATE_Z_THRESHOLD) -> list[UpdateFlag]:
    """:func:`score_slabs` from each update's own layers (``updates[k][i]``: layer i of update k,
    any shape of global layer i's size), so no (K, d) slab is needed."""
    count = len(agent_ids)
    squares = np.zeros(count)
    dots = np.zeros(count)
    median_square = 0.0
    for i, (glob, median) in enumerate(zip(global_layers, median_layers, strict=True)):
        base = np.asarray(glob, dtype=np.float64).reshape(-1)
        median_delta = np.asarray(median, dtype=np.float64).reshape(-1) - base
        median_square += float(median_delta @ median_delta)
        for k in range(count):
            delta = np.reshape(updates[k][i], -1).astype(np.float64) - base
            squares[k] += float(delta @ delta)
            dots[k] += float(delta @ median_delta)
    norms = np.sqrt(squares)
    scale = norms * np.sqrt(median_square)
    cosines = np.divide(dots, scale, out=np.ones(count), where=scale > 0)
    norm_z, cosine_z = update_z_scores(norms, cosines)
    return [UpdateFlag(agent, float(norms[k]), float(norm_z[k]), float(cosines[k]), float(cosine_z[k]),
                       _reasons(float(norm_z[k]), float(cosine_z[k]), z_threshold))
            for k, agent in enumerate(agent_ids)]


def score_against_median(reference: Sequence[NDArray[np.floating]],
                         updates: Sequence[Sequence[NDArray[np.generic]]], agent_ids: Sequence[AgentId],
                         z_threshold: float = UPDATE_Z_THRESHOLD) -> list[UpdateFlag]:
    """:func:`score_rows` against the updates' coordinate-wise median, computed block by block
    (no (K, d) slab). ``reference`` is what deltas are taken from: the global model, or zeros when
    the updates are deltas already. Raises ValueError when the median is not finite."""
    from federated_learning.aggregation.median import median_of_updates

    median = median_of_updates(updates, reference)
    if median is None:
        raise ValueError("the median of the updates is not finite")
    return score_rows(reference, updates, median, agent_ids, z_threshold)
