"""Aggregation rules by name, created from plain keyword hyperparameters (as in a config file)."""

from __future__ import annotations

import inspect

from .base import Strategy
from .bulyan import Bulyan
from .fedavg import FedAvg, FedProx, FedSGD
from .fedavgm import FedAvgM
from .fedbuff import FedBuff
from .fedopt import FedAdagrad, FedAdam, FedYogi
from .krum import Krum, MultiKrum
from .median import Median
from .perffedavg import PerFedAvg
from .trimmed_mean import TrimmedMean

RULES: dict[str, type[Strategy]] = {
    rule.name: rule
    for rule in (
        FedAvg,
        FedProx,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FedSGD,
        PerFedAvg,
        Krum,
        MultiKrum,
        TrimmedMean,
        Median,
        Bulyan,
        FedBuff,
    )
}


def rule_parameters(name: str) -> dict[str, inspect.Parameter]:
    """Keyword hyperparameters a rule accepts, by name."""
    signature = inspect.signature(RULES[name].__init__)
    return {key: p for key, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY}


def create_strategy(name: str, **params: object) -> Strategy:
    """A fresh rule ``name`` with hyperparameters ``params``; ValueError names any bad value."""
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; known: {', '.join(RULES)}")
    accepted = rule_parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        listing = ", ".join(accepted) or "none"
        raise ValueError(f"{name} has no parameter {unknown[0]!r}; accepted: {listing}")
    missing = [key for key, p in accepted.items() if p.default is p.empty and key not in params]
    if missing:
        raise ValueError(f"{name} requires parameter {missing[0]!r}")
    return RULES[name](**params)
