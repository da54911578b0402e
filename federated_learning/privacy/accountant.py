"""Renyi-DP accountant of the Poisson-sampled Gaussian mechanism, and of Laplace releases.

RDP of the sampled Gaussian mechanism (SGM) follows Mironov, Talwar and Zhang,
"Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019, arXiv:1908.10530:
for an order alpha > 1, sampling rate q in (0, 1) and noise multiplier sigma (noise std
divided by the L2 sensitivity), RDP(alpha) = log(A_alpha) / (alpha - 1), where

    A_alpha = E_{z ~ mu_0} [((1 - q) + q * mu_1(z) / mu_0(z)) ** alpha],
    mu_0 = N(0, sigma^2), mu_1 = N(1, sigma^2).

Integer alpha uses the binomial closed form (Sec. 3.2)
    A_alpha = sum_{i=0}^{alpha} C(alpha, i) (1 - q)^(alpha - i) q^i exp((i^2 - i) / (2 sigma^2)),
fractional alpha the two-sided series of Sec. 3.3, truncated the way TF-Privacy and
Google's dp-accounting truncate it, so both libraries agree to rounding. Sums of
exponentials are taken in log space (`log_add`, `log_sub`) because A_alpha overflows a
float64 for small sigma and large alpha.

RDP composes additively over steps and events. (epsilon, delta) comes from the improved
conversion of Balle et al., "Hypothesis Testing Interpretations and Renyi Differential
Privacy", 2020, arXiv:2004.00010, Prop. 12 (also Canonne, Kamath and Steinke 2020,
arXiv:2001.05990, Eq. 20):
    epsilon = min_alpha  RDP(alpha) + log1p(-1/alpha) - log(delta * alpha) / (alpha - 1),
the same rule as dp-accounting's `RdpAccountant`. The bound holds at every order alpha > 1
on its own, so the minimum over any grid is valid; `DEFAULT_ORDERS` is a superset of
dp-accounting's default grid and can only give a smaller (tighter) epsilon than it.

Laplace releases (pure epsilon-DP each) are accounted two ways and the smaller epsilon
is reported, both being valid upper bounds: pure composition (epsilons add, on top of the
Gaussian part's (epsilon, delta)), and RDP composition with the exact Laplace RDP curve of
Mironov, "Renyi Differential Privacy", 2017, arXiv:1702.07476, Prop. 6.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

from federated_learning.privacy.errors import BudgetExhausted, CalibrationFailed

logger = logging.getLogger(__name__)

FloatVector = NDArray[np.float64]

DP_ACCOUNTING_DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)
"""The order grid of dp-accounting's RdpAccountant (1.1 to 10.9 by 0.1, 11 to 63, 128 to 1024)."""

DEFAULT_ORDERS: tuple[float, ...] = tuple(
    sorted(
        set(DP_ACCOUNTING_DEFAULT_ORDERS)
        | {1 + x / 100.0 for x in range(2, 10)}
        | {float(a) for a in range(64, 128, 4)}
        | {float(a) for a in range(128, 512, 32)}
        | {768.0, 2048.0}
    )
)
"""Our grid: a superset of dp-accounting's, so our epsilon is never larger than theirs.

Extra orders go where the optimum moves for very large epsilon (1.02 to 1.09) and for
small epsilon with many steps (64 to 2048, where dp-accounting jumps by powers of two).
"""

MAX_SERIES_TERMS = 1000
"""Cap on terms of the fractional-order series (dp-accounting's _MAX_STEPS_LOG_A_FRAC)."""

_FIRST_SERIES_CHUNK = 64
_SERIES_STOP_LOG_RATIO = 30.0
_IMPROVED_CONVERSION_MIN_ORDER = 1.01

MAX_BRACKET_DOUBLINGS = 40
"""Cap on doublings of the noise multiplier while looking for one that meets the target."""

MAX_BISECTION_ITERATIONS = 100
"""Cap on bisection steps of `compute_noise_multiplier`."""

NOISE_SEARCH_RELATIVE_TOLERANCE = 1e-5
"""Bisection stops when the bracket is narrower than this fraction of its upper end."""


def log_add(logx: float, logy: float) -> float:
    """log(exp(logx) + exp(logy)), stable for any magnitudes; -inf stands for log(0)."""
    a, b = min(logx, logy), max(logx, logy)
    if a == -math.inf:
        return b
    return math.log1p(math.exp(a - b)) + b


def log_sub(logx: float, logy: float) -> float:
    """log(exp(logx) - exp(logy)) for logx >= logy; -inf when they are equal."""
    if logx < logy:
        raise ValueError(f"log_sub needs logx >= logy; got logx={logx}, logy={logy}")
    if logy == -math.inf:
        return logx
    if logx == logy:
        return -math.inf
    return logx + math.log1p(-math.exp(logy - logx))


def _log_a_integer(q: float, sigma: float, alphas: NDArray[np.int64]) -> FloatVector:
    """log(A_alpha) for integer orders by the binomial closed form (MTZ 2019, Sec. 3.2).

    All orders are evaluated at once as one ragged sum: segment k holds the terms
    i = 0..alphas[k], reduced with a max-shifted log-sum-exp per segment.
    """
    from scipy import special  # here: 25 MB and 0.3 s that the services which never account spare

    lengths = alphas + 1
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    alpha = np.repeat(alphas, lengths).astype(np.float64)
    i = np.arange(int(lengths.sum()), dtype=np.float64) - np.repeat(starts, lengths)
    log_terms = (
        special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1)
        + i * math.log(q) + (alpha - i) * math.log1p(-q)
        + (i * i - i) / (2.0 * sigma**2)
    )
    peak = np.maximum.reduceat(log_terms, starts)
    sums = np.add.reduceat(np.exp(log_terms - np.repeat(peak, lengths)), starts)
    result: FloatVector = peak + np.log(sums)
    return result


def _log_a_fractional_terms(
    q: float, sigma: float, alphas: FloatVector, num_terms: int
) -> tuple[FloatVector, NDArray[np.bool_]]:
    """Truncated series for log(A_alpha), fractional alpha (MTZ 2019, Sec. 3.3).

    A_alpha = sum_i C(alpha, i) q^i (1-q)^(alpha-i) e^((i^2-i)/(2 sigma^2)) Phi((z0-i)/sigma)
            + sum_i C(alpha, i) q^(alpha-i) (1-q)^i e^((j^2-j)/(2 sigma^2)) Phi((j-z0)/sigma),
    with j = alpha - i and z0 = sigma^2 log(1/q - 1) + 1/2. |C(alpha, i)| is used for
    i > alpha, which upper-bounds the series. The sum stops at the first term where both
    halves decrease and are below e^-30 of the running total, as in dp-accounting.

    Returns:
        (log_a, converged): float64 and bool arrays of alphas' shape.
    """
    from scipy import special

    i = np.arange(num_terms, dtype=np.float64)[None, :]
    alpha = alphas[:, None]
    j = alpha - i
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    log_coef = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(j + 1)
    log_s0 = (
        log_coef + i * log_q + j * log_1mq + (i * i - i) / (2.0 * sigma**2)
        + special.log_ndtr((z0 - i) / sigma)
    )
    log_s1 = (
        log_coef + j * log_q + i * log_1mq + (j * j - j) / (2.0 * sigma**2)
        + special.log_ndtr((j - z0) / sigma)
    )
    total = np.logaddexp(np.logaddexp.accumulate(log_s0, axis=1),
                         np.logaddexp.accumulate(log_s1, axis=1))
    stop = np.zeros_like(total, dtype=bool)
    stop[:, 1:] = (
        (log_s0[:, 1:] < log_s0[:, :-1]) & (log_s1[:, 1:] < log_s1[:, :-1])
        & (np.maximum(log_s0, log_s1)[:, 1:] < total[:, 1:] - _SERIES_STOP_LOG_RATIO)
    )
    converged: NDArray[np.bool_] = np.asarray(stop.any(axis=1))
    first_stop = np.argmax(stop, axis=1)
    log_a: FloatVector = np.where(
        converged, total[np.arange(alphas.size), first_stop], np.inf
    )
    return log_a, converged


def _log_a_fractional(q: float, sigma: float, alphas: FloatVector) -> FloatVector:
    """log(A_alpha) for fractional orders; +inf (order skipped) where the series does not stop."""
    log_a, converged = _log_a_fractional_terms(q, sigma, alphas, _FIRST_SERIES_CHUNK)
    slow = ~converged
    if slow.any():
        log_a_slow, converged_slow = _log_a_fractional_terms(
            q, sigma, alphas[slow], MAX_SERIES_TERMS
        )
        log_a[slow] = log_a_slow
        if not converged_slow.all():
            logger.warning(
                "fractional RDP series did not converge in %s terms for q=%s sigma=%s "
                "orders=%s; those orders are skipped",
                MAX_SERIES_TERMS, q, sigma, alphas[slow][~converged_slow].tolist(),
            )
    return log_a


@functools.lru_cache(maxsize=512)
def _rdp_sampled_gaussian_cached(
    sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]
) -> FloatVector:
    alphas = np.asarray(orders, dtype=np.float64)
    if noise_multiplier == 0.0:
        return np.full_like(alphas, np.inf)
    if sample_rate == 1.0:
        return alphas / (2.0 * noise_multiplier**2)
    rdp = np.empty_like(alphas)
    is_int = alphas == np.floor(alphas)
    if is_int.any():
        rdp[is_int] = _log_a_integer(
            sample_rate, noise_multiplier, alphas[is_int].astype(np.int64)
        )
    if (~is_int).any():
        rdp[~is_int] = _log_a_fractional(sample_rate, noise_multiplier, alphas[~is_int])
    rdp /= alphas - 1.0
    rdp.setflags(write=False)
    return rdp


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    checked = tuple(float(a) for a in orders)
    if not checked:
        raise ValueError("orders must not be empty")
    bad = [a for a in checked if not (a > 1.0 and math.isfinite(a))]
    if bad:
        raise ValueError(f"RDP orders must be finite and > 1; got {bad[:5]}")
    return checked


def _check_sample_rate(sample_rate: float) -> None:
    # q = 0 would make every release free (RDP 0); no release happens with q = 0, so a 0
    # here is a caller's error (e.g. a rate rounded down) and must not zero the bill.
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sampling rate must be in (0, 1]; got {sample_rate}")


def _check_noise_multiplier(noise_multiplier: float) -> None:
    if not (noise_multiplier > 0.0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise multiplier must be finite and > 0; got {noise_multiplier}")


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1); got {delta}")


def _check_epsilon(epsilon: float, name: str = "epsilon") -> None:
    if not (epsilon > 0.0 and math.isfinite(epsilon)):
        raise ValueError(f"{name} must be finite and > 0; got {epsilon}")


def rdp_sampled_gaussian(
    sample_rate: float, noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> FloatVector:
    """RDP of one step of the Poisson-sampled Gaussian mechanism at each order (MTZ 2019).

    Args:
        sample_rate: probability q in (0, 1] that a record (agent) takes part in the step.
        noise_multiplier: sigma = noise std / L2 sensitivity, >= 0 (0 gives +inf).
        orders: Renyi orders alpha > 1.

    Returns:
        float64 array of shape (len(orders),), in nats; +inf marks an order that is skipped.
    """
    _check_sample_rate(sample_rate)
    if not (noise_multiplier >= 0.0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise multiplier must be finite and >= 0; got {noise_multiplier}")
    return _rdp_sampled_gaussian_cached(
        float(sample_rate), float(noise_multiplier), _check_orders(orders)
    )


def rdp_laplace(epsilon: float, orders: Sequence[float] = DEFAULT_ORDERS) -> FloatVector:
    """RDP of one epsilon-DP Laplace release at each order (Mironov 2017, Prop. 6).

    RDP(alpha) = eps + log1p((alpha - 1) * expm1((1 - 2 alpha) eps) / (2 alpha - 1)) / (alpha - 1),
    tight for the Laplace mechanism and never above eps.

    Returns:
        float64 array of shape (len(orders),), in nats.
    """
    _check_epsilon(epsilon)
    alphas = np.asarray(_check_orders(orders), dtype=np.float64)
    c = np.expm1(epsilon * (1.0 - 2.0 * alphas)) / (2.0 * alphas - 1.0)
    result: FloatVector = epsilon + np.log1p((alphas - 1.0) * c) / (alphas - 1.0)
    return result


def epsilon_from_rdp(
    orders: Sequence[float], rdp: Sequence[float] | FloatVector, delta: float
) -> tuple[float, float]:
    """Smallest epsilon over orders such that the RDP curve implies (epsilon, delta)-DP.

    Improved conversion (Balle et al. 2020, arXiv:2004.00010, Prop. 12):
    eps(alpha) = rdp + log1p(-1/alpha) - log(delta * alpha) / (alpha - 1), for alpha > 1.01
    (the bound is numerically unstable closer to 1). An order whose RDP already implies
    delta through the KL bound delta <= sqrt(1 - exp(-rdp)) gives epsilon 0.

    Returns:
        (epsilon, optimal order); epsilon is +inf when no order gives a finite bound.
    """
    _check_delta(delta)
    alphas = np.asarray(orders, dtype=np.float64)
    values = np.asarray(rdp, dtype=np.float64)
    if alphas.shape != values.shape:
        raise ValueError(f"orders and rdp differ in shape: {alphas.shape} vs {values.shape}")
    eps = np.full_like(alphas, np.inf)
    usable = alphas > _IMPROVED_CONVERSION_MIN_ORDER
    eps[usable] = (
        values[usable] + np.log1p(-1.0 / alphas[usable])
        - np.log(delta * alphas[usable]) / (alphas[usable] - 1.0)
    )
    eps[(delta**2 + np.expm1(-values)) > 0] = 0.0
    if (values < 0).any():
        logger.warning("negative RDP %s at orders %s; treated as 0", values[values < 0],
                       alphas[values < 0])
        eps[values < 0] = 0.0
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(alphas[best])


def delta_from_rdp(
    orders: Sequence[float], rdp: Sequence[float] | FloatVector, epsilon: float
) -> tuple[float, float]:
    """Smallest delta over orders such that the RDP curve implies (epsilon, delta)-DP.

    Inverse of `epsilon_from_rdp` (Balle et al. 2020, Prop. 12), minimised together with
    the KL bound delta <= sqrt(1 - exp(-rdp)):
    log delta(alpha) = (alpha - 1)(rdp - eps + log1p(-1/alpha)) - log(alpha).

    Returns:
        (delta, optimal order), delta in [0, 1].
    """
    if not epsilon >= 0.0:
        raise ValueError(f"epsilon must be >= 0; got {epsilon}")
    alphas = np.asarray(orders, dtype=np.float64)
    values = np.asarray(rdp, dtype=np.float64)
    if alphas.shape != values.shape:
        raise ValueError(f"orders and rdp differ in shape: {alphas.shape} vs {values.shape}")
    with np.errstate(divide="ignore"):
        log_delta = 0.5 * np.log(-np.expm1(-np.maximum(values, 0.0)))
    usable = alphas > _IMPROVED_CONVERSION_MIN_ORDER
    a = alphas[usable]
    log_delta[usable] = np.minimum(
        log_delta[usable],
        (a - 1.0) * (values[usable] - epsilon + np.log1p(-1.0 / a)) - np.log(a),
    )
    best = int(np.argmin(log_delta))
    return min(1.0, math.exp(float(log_delta[best]))), float(alphas[best])


@dataclass(frozen=True)
class GaussianEvent:
    """`steps` compositions of the Poisson-sampled Gaussian mechanism.

    noise_multiplier is sigma = noise std / L2 sensitivity; sample_rate is the probability
    that each agent takes part in a step.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int = 1

    kind = "gaussian"

    def __post_init__(self) -> None:
        _check_noise_multiplier(self.noise_multiplier)
        _check_sample_rate(self.sample_rate)
        _check_steps(self.steps)

    def rdp(self, orders: Sequence[float]) -> FloatVector:
        """RDP of all steps at each order."""
        return self.steps * rdp_sampled_gaussian(self.sample_rate, self.noise_multiplier, orders)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {"kind": self.kind, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": self.steps}


@dataclass(frozen=True)
class LaplaceEvent:
    """`steps` epsilon-DP Laplace releases (noise scale = L1 sensitivity / epsilon)."""

    epsilon: float
    steps: int = 1

    kind = "laplace"

    def __post_init__(self) -> None:
        _check_epsilon(self.epsilon)
        _check_steps(self.steps)

    def rdp(self, orders: Sequence[float]) -> FloatVector:
        """RDP of all steps at each order."""
        return self.steps * rdp_laplace(self.epsilon, orders)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {"kind": self.kind, "epsilon": self.epsilon, "steps": self.steps}


PrivacyEvent: TypeAlias = GaussianEvent | LaplaceEvent


def event_from_dict(data: Mapping[str, Any]) -> PrivacyEvent:
    """Inverse of `GaussianEvent.to_dict` / `LaplaceEvent.to_dict`."""
    kind = data.get("kind")
    if kind == GaussianEvent.kind:
        return GaussianEvent(float(data["noise_multiplier"]), float(data["sample_rate"]),
                             int(data["steps"]))
    if kind == LaplaceEvent.kind:
        return LaplaceEvent(float(data["epsilon"]), int(data["steps"]))
    raise ValueError(f"privacy event kind must be 'gaussian' or 'laplace'; got {kind!r}")


def _merged(last: PrivacyEvent, new: PrivacyEvent) -> PrivacyEvent | None:
    """One event standing for `last` then `new` when they differ only in steps."""
    if (isinstance(last, GaussianEvent) and isinstance(new, GaussianEvent)
            and (last.noise_multiplier, last.sample_rate)
            == (new.noise_multiplier, new.sample_rate)):
        return GaussianEvent(last.noise_multiplier, last.sample_rate, last.steps + new.steps)
    if (isinstance(last, LaplaceEvent) and isinstance(new, LaplaceEvent)
            and last.epsilon == new.epsilon):
        return LaplaceEvent(last.epsilon, last.steps + new.steps)
    return None


@dataclass(frozen=True)
class _Ledger:
    """Accumulated privacy loss: Gaussian RDP, Laplace RDP and Laplace pure epsilon."""

    rdp_gaussian: FloatVector
    rdp_laplace: FloatVector
    laplace_epsilon: float
    has_gaussian: bool

    def plus(self, event: PrivacyEvent, orders: Sequence[float]) -> _Ledger:
        if isinstance(event, GaussianEvent):
            return _Ledger(self.rdp_gaussian + event.rdp(orders), self.rdp_laplace,
                           self.laplace_epsilon, True)
        return _Ledger(self.rdp_gaussian, self.rdp_laplace + event.rdp(orders),
                       self.laplace_epsilon + event.epsilon * event.steps, self.has_gaussian)

    def epsilon(self, orders: Sequence[float], delta: float) -> float:
        gaussian_eps = epsilon_from_rdp(orders, self.rdp_gaussian, delta)[0]
        if self.laplace_epsilon == 0.0:
            return gaussian_eps if self.has_gaussian else 0.0
        pure = self.laplace_epsilon + (gaussian_eps if self.has_gaussian else 0.0)
        joint = epsilon_from_rdp(orders, self.rdp_gaussian + self.rdp_laplace, delta)[0]
        return min(pure, joint)

    def delta(self, orders: Sequence[float], epsilon: float) -> float:
        joint = delta_from_rdp(orders, self.rdp_gaussian + self.rdp_laplace, epsilon)[0]
        if epsilon < self.laplace_epsilon:
            return joint
        if not self.has_gaussian:
            return 0.0
        pure = delta_from_rdp(orders, self.rdp_gaussian, epsilon - self.laplace_epsilon)[0]
        return min(pure, joint)


class PrivacyAccountant:
    """Tracks the privacy spent by releases against an (epsilon, delta) target.

    Each `step` charges an event; with `strict=True` (the default) a charge that would
    take epsilon past the target raises `BudgetExhausted` and leaves the ledger unchanged,
    so the caller releases nothing. Consecutive events with equal parameters are stored as
    one event with summed steps, which keeps `to_dict()` small over many rounds.
    """

    def __init__(
        self, target_epsilon: float, target_delta: float,
        orders: Sequence[float] = DEFAULT_ORDERS,
    ) -> None:
        _check_epsilon(target_epsilon, "target epsilon")
        _check_delta(target_delta)
        self.target_epsilon = float(target_epsilon)
        self.target_delta = float(target_delta)
        self.orders = _check_orders(orders)
        zeros = np.zeros(len(self.orders))
        self._ledger = _Ledger(zeros, zeros, 0.0, False)
        self._events: list[PrivacyEvent] = []

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """Charged events in order, equal consecutive ones merged."""
        return tuple(self._events)

    def step(
        self, noise_multiplier: float, sample_rate: float, steps: int = 1, *, strict: bool = True
    ) -> float:
        """Charge `steps` sampled-Gaussian releases; returns epsilon spent afterwards.

        Raises:
            BudgetExhausted: strict and the charge would exceed the target (nothing charged).
                With strict=False the event is recorded anyway, for releases that already
                happened (e.g. noise added by agents under local DP).
        """
        return self._charge(GaussianEvent(noise_multiplier, sample_rate, steps), strict)

    def step_laplace(self, epsilon: float, steps: int = 1, *, strict: bool = True) -> float:
        """Charge `steps` epsilon-DP Laplace releases; returns epsilon spent afterwards."""
        return self._charge(LaplaceEvent(epsilon, steps), strict)

    def charge(self, event: PrivacyEvent, *, strict: bool = True) -> float:
        """Charge a prepared event; same rules as `step`."""
        return self._charge(event, strict)

    def would_exceed(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> bool:
        """Whether charging these releases would take epsilon past the target; charges nothing."""
        event = GaussianEvent(noise_multiplier, sample_rate, steps)
        return self._ledger.plus(event, self.orders).epsilon(
            self.orders, self.target_delta) > self.target_epsilon

    def would_exceed_laplace(self, epsilon: float, steps: int = 1) -> bool:
        """Whether charging these Laplace releases would exceed the target; charges nothing."""
        return self._ledger.plus(LaplaceEvent(epsilon, steps), self.orders).epsilon(
            self.orders, self.target_delta) > self.target_epsilon

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at `delta` (default: the target delta)."""
        delta = self.target_delta if delta is None else delta
        _check_delta(delta)
        return self._ledger.epsilon(self.orders, delta)

    def get_delta(self, epsilon: float | None = None) -> float:
        """Smallest delta for which the releases so far are (epsilon, delta)-DP."""
        epsilon = self.target_epsilon if epsilon is None else epsilon
        if not epsilon >= 0.0:
            raise ValueError(f"epsilon must be >= 0; got {epsilon}")
        return self._ledger.delta(self.orders, epsilon)

    def remaining(self) -> float:
        """Epsilon left before the target, at the target delta; never negative."""
        return max(0.0, self.target_epsilon - self.get_epsilon())

    def is_budget_exhausted(self) -> bool:
        """True once the spent epsilon has reached the target."""
        return self.get_epsilon() >= self.target_epsilon

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state: targets, orders and events; `from_dict` rebuilds the ledger."""
        return {
            "format": 1,
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "orders": list(self.orders),
            "events": [event.to_dict() for event in self._events],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyAccountant:
        """Rebuild an accountant from `to_dict()` output (events are replayed, not trusted)."""
        if data.get("format") != 1:
            raise ValueError(f"accountant state format must be 1; got {data.get('format')!r}")
        accountant = cls(float(data["target_epsilon"]), float(data["target_delta"]),
                         [float(a) for a in data["orders"]])
        for event in data["events"]:
            accountant._charge(event_from_dict(event), strict=False)
        return accountant

    def _charge(self, event: PrivacyEvent, strict: bool) -> float:
        ledger = self._ledger.plus(event, self.orders)
        spent = ledger.epsilon(self.orders, self.target_delta)
        if strict and spent > self.target_epsilon:
            raise BudgetExhausted(spent, self.target_epsilon, self.target_delta)
        self._ledger = ledger
        merged = _merged(self._events[-1], event) if self._events else None
        if merged is None:
            self._events.append(event)
        else:
            self._events[-1] = merged
        return spent


def sampled_gaussian_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """Epsilon at `delta` of `steps` sampled-Gaussian releases (one-shot, no accountant)."""
    _check_steps(steps)
    rdp = steps * rdp_sampled_gaussian(sample_rate, noise_multiplier, orders)
    return epsilon_from_rdp(orders, rdp, delta)[0]


def compute_noise_multiplier(
    target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """Smallest noise multiplier whose `steps` sampled-Gaussian releases meet the target.

    Bisection on sigma (epsilon decreases in sigma): the bracket's upper end always meets
    the target and is returned once the bracket is narrower than
    NOISE_SEARCH_RELATIVE_TOLERANCE of it.

    Raises:
        ValueError: an argument out of range, e.g. sample_rate outside (0, 1].
        CalibrationFailed: no sigma below 2**MAX_BRACKET_DOUBLINGS meets the target.
    """
    _check_epsilon(target_epsilon, "target epsilon")
    _check_delta(target_delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    orders = _check_orders(orders)

    def meets(sigma: float) -> bool:
        return sampled_gaussian_epsilon(sigma, sample_rate, steps, target_delta,
                                        orders) <= target_epsilon

    low, high = 0.0, 1.0
    for _ in range(MAX_BRACKET_DOUBLINGS):
        if meets(high):
            break
        low, high = high, 2.0 * high
    else:
        logger.warning("no noise multiplier up to %s meets epsilon=%s delta=%s q=%s steps=%s",
                       high, target_epsilon, target_delta, sample_rate, steps)
        raise CalibrationFailed(
            f"no noise multiplier up to {high:g} gives epsilon <= {target_epsilon} at "
            f"delta={target_delta} with sample rate {sample_rate} over {steps} steps"
        )
    for _ in range(MAX_BISECTION_ITERATIONS):
        if high - low <= NOISE_SEARCH_RELATIVE_TOLERANCE * high:
            return high
        middle = 0.5 * (low + high)
        if meets(middle):
            high = middle
        else:
            low = middle
    logger.warning("noise bisection stopped after %s steps at [%s, %s] for epsilon=%s delta=%s "
                   "q=%s steps=%s", MAX_BISECTION_ITERATIONS, low, high, target_epsilon,
                   target_delta, sample_rate, steps)
    return high
