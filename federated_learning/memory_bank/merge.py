"""Merging agents' memory banks into one global bank (federated PatchCore).

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", 2021, arXiv:2106.08265:
the memory bank is subsampled by greedy k-center (Gonzalez 1985, a 2-approximation of the
k-center optimum) in a Gaussian random projection of the features.

Each agent uploads a bank (N_i, D); the union keeps at most ``target_size`` rows.
- weighted=True: the target is shared among the banks in proportion to their example
  counts (largest remainder, capped at each bank's size, the surplus passed on to the
  others); within those quotas rows are picked by greedy k-center over the union
  ("coreset") or uniformly within each bank ("random").
- weighted=False: the union is one pool: plain greedy k-center over it ("coreset") or a
  uniform sample of it ("random"); example counts play no part.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from .coreset import (
    DEFAULT_PROJECTION_DIM,
    check_count,
    greedy_projected,
    position_buffer,
    project_into,
    projection_matrix,
)
from .scoring import check_rows

METHODS = ("coreset", "random")


def check_banks(banks: Sequence[NDArray[np.floating]]) -> int:
    """Non-empty 2-D finite float banks of one feature width; return the width."""
    if len(banks) == 0:
        raise ValueError("no memory banks to merge")
    for i, bank in enumerate(banks):
        check_rows(f"memory bank {i}", bank)
        if bank.shape[1] != banks[0].shape[1]:
            raise ValueError(f"memory bank {i} has {bank.shape[1]} features; "
                             f"bank 0 has {banks[0].shape[1]}")
    return int(banks[0].shape[1])


def check_num_examples(num_examples: Sequence[int], num_banks: int) -> NDArray[np.int64]:
    """Example counts: one int > 0 per bank."""
    if len(num_examples) != num_banks:
        raise ValueError(f"got {len(num_examples)} example counts for {num_banks} banks")
    for i, n in enumerate(num_examples):
        check_count(f"bank {i} example count", n, 1)
    return np.asarray([int(n) for n in num_examples], dtype=np.int64)


def client_quotas(
    sizes: NDArray[np.int64], weights: NDArray[np.int64], target: int
) -> NDArray[np.int64]:
    """Rows per bank: proportional to weights, largest remainder, capped at each bank's size,
    the rows a full bank cannot take shared again among the others."""
    quotas = np.zeros(sizes.size, dtype=np.int64)
    open_banks = np.ones(sizes.size, dtype=bool)
    left = target
    while left > 0 and open_banks.any():
        share = np.where(open_banks, weights, 0).astype(np.float64)
        raw = left * share / share.sum()
        extra = np.floor(raw).astype(np.int64)
        shortfall = left - int(extra.sum())
        order = np.argsort(-(raw - extra), kind="stable")
        extra[order[:shortfall]] += 1
        capped = np.minimum(quotas + extra, sizes)
        left -= int((capped - quotas).sum())
        quotas = capped
        open_banks = quotas < sizes
    return quotas


def random_pick(
    offsets: NDArray[np.int64], quotas: NDArray[np.int64], rng: np.random.Generator
) -> NDArray[np.int64]:
    """Uniform rows without replacement within each bank; union-row indices, sorted."""
    picks = [
        offsets[i] + rng.choice(offsets[i + 1] - offsets[i], size=int(q), replace=False)
        for i, q in enumerate(quotas)
    ]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def gather_rows(
    banks: Sequence[NDArray[np.floating]], offsets: NDArray[np.int64], rows: NDArray[np.int64]
) -> NDArray[np.float32]:
    """Union rows ``rows`` (indices into the concatenated banks), float32, without the union."""
    bank_of = np.searchsorted(offsets, rows, side="right") - 1
    out = np.empty((rows.size, banks[0].shape[1]), dtype=np.float32)
    for i, bank in enumerate(banks):
        mine = np.flatnonzero(bank_of == i)
        if mine.size:
            out[mine] = bank[rows[mine] - offsets[i]]
    return out


def merge_banks(
    banks: Sequence[NDArray[np.floating]],
    num_examples: Sequence[int],
    target_size: int,
    *,
    method: str = "coreset",
    weighted: bool = True,
    seed: int = 0,
    projection_dim: int = DEFAULT_PROJECTION_DIM,
) -> NDArray[np.float32]:
    """The global bank: at most ``target_size`` rows of the union of ``banks``, float32 (n, D).

    Rows come in pick order for "coreset", in bank-then-row order for "random"; the whole
    union (bank order) when it has at most ``target_size`` rows.
    """
    check_banks(banks)
    counts = check_num_examples(num_examples, len(banks))
    target = check_count("memory bank target_size", target_size, 1)
    projection_dim = check_count("memory bank projection_dim", projection_dim, 1)
    if method not in METHODS:
        raise ValueError(f"memory bank method must be one of {METHODS}; got {method!r}")
    sizes = np.asarray([bank.shape[0] for bank in banks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    if total <= target:
        return np.concatenate([np.asarray(bank, dtype=np.float32) for bank in banks], axis=0)
    rng = np.random.default_rng(seed)
    if weighted:
        quotas = client_quotas(sizes, counts, target)
        owners = np.repeat(np.arange(len(banks), dtype=np.int64), sizes)
    else:
        quotas = np.array([target], dtype=np.int64)
        owners = np.zeros(total, dtype=np.int64)
    if method == "random":
        group_offsets = offsets if weighted else np.array([0, total], dtype=np.int64)
        return gather_rows(banks, offsets, random_pick(group_offsets, quotas, rng))
    width = banks[0].shape[1]
    projection = projection_matrix(width, projection_dim, rng) if width > projection_dim else None
    buffer = position_buffer(total, min(width, projection_dim))
    for i, bank in enumerate(banks):
        project_into(bank, projection, buffer[offsets[i] : offsets[i + 1]])
    picks = greedy_projected(buffer, total, target, owners, quotas, rng)
    return gather_rows(banks, offsets, picks)
