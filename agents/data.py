"""Demo data for agents: scikit-learn's bundled digits, split across simulated clients.

Partitions:

- ``iid``: a random permutation cut into near-equal shards.
- ``dirichlet:<alpha>``: label-distribution skew as in Hsu, Qi and Brown, "Measuring the
  Effects of Non-Identical Data Distribution for Federated Visual Classification", 2019,
  arXiv:1909.06335: for every class c, proportions ``q_c ~ Dir(alpha * 1_K)`` over the K
  clients decide how the examples of c are shared. Small alpha -> each client holds few
  classes. Clients left below ``min_size`` examples are then topped up deterministically
  from the largest client (see ``rebalance_min_size``).

Everything is deterministic in the seed it is given; no data is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split as _stratified_split

DIGITS_PIXEL_MAX = 16.0
DEFAULT_MIN_SIZE = 8
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_EVAL_FRACTION = 0.2
DEFAULT_TEST_SEED = 0

Indices = NDArray[np.int64]


@dataclass(frozen=True)
class Dataset:
    """Features x (N, F) float32 and integer labels y (N,) int64."""

    x: NDArray[np.float32]
    y: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: Indices) -> Dataset:
        """The examples at ``indices``, in that order (copies)."""
        return Dataset(self.x[indices], self.y[indices])


@dataclass(frozen=True)
class ClientData:
    """One simulated client's private data: local training set and local held-out set."""

    client_id: int
    train: Dataset
    eval: Dataset


@dataclass(frozen=True)
class PartitionSpec:
    """How examples are shared among clients: ``iid`` or ``dirichlet`` with concentration alpha."""

    kind: Literal["iid", "dirichlet"]
    alpha: float | None = None

    def __str__(self) -> str:
        return "iid" if self.kind == "iid" else f"dirichlet:{self.alpha:g}"


def load_digits_dataset() -> Dataset:
    """The 1797 8x8 digit images, 10 classes; pixels scaled from [0, 16] to [0, 1], float32."""
    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / DIGITS_PIXEL_MAX).astype(np.float32)
    return Dataset(x, np.asarray(bunch.target, dtype=np.int64))


def train_test_split(
    data: Dataset, *, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_TEST_SEED
) -> tuple[Dataset, Dataset]:
    """Stratified split into (train, test), deterministic in ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    idx_train, idx_test = _stratified_split(
        np.arange(len(data)), test_size=test_fraction, random_state=seed, stratify=data.y
    )
    return data.subset(np.sort(idx_train)), data.subset(np.sort(idx_test))


def parse_partition(text: str) -> PartitionSpec:
    """Parse ``"iid"`` or ``"dirichlet:<alpha>"`` (alpha finite and > 0)."""
    kind, sep, arg = text.strip().partition(":")
    if kind == "iid" and not sep:
        return PartitionSpec("iid")
    if kind == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"partition '{text}': alpha '{arg}' is not a number") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"partition '{text}': alpha must be finite and > 0; got {alpha}")
        return PartitionSpec("dirichlet", alpha)
    raise ValueError(f"unknown partition '{text}'; expected 'iid' or 'dirichlet:<alpha>'")


def _check_clients(num_examples: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1; got {num_clients}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1; got {min_size}")
    if num_clients * min_size > num_examples:
        raise ValueError(
            f"{num_clients} clients with at least {min_size} examples each need "
            f"{num_clients * min_size} examples; got {num_examples}"
        )


def partition_iid(
    y: NDArray[np.integer], num_clients: int, rng: np.random.Generator
) -> list[Indices]:
    """Shuffle all indices and cut them into ``num_clients`` shards whose sizes differ by <= 1.

    Returns one sorted int64 index array per client; together they cover every index once.
    """
    _check_clients(len(y), num_clients, 1)
    shards = np.array_split(rng.permutation(len(y)).astype(np.int64), num_clients)
    return [np.sort(s) for s in shards]


def _dirichlet_draw(
    y: NDArray[np.integer], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """Share each class's shuffled indices among clients at ``floor(cumsum(q_c) * n_c)``."""
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(int(i) for i in chunk)
    return parts


def rebalance_min_size(parts: list[list[int]], y: NDArray[np.integer], min_size: int) -> None:
    """In place: while some client holds fewer than ``min_size`` examples, move one example
    from the largest client (first on ties), taken from that client's most frequent class,
    to the smallest client (first on ties).

    Terminates because the caller guarantees ``len(parts) * min_size <= total``, so the
    largest client always holds more than ``min_size`` while the smallest holds fewer.
    Taking from the donor's most plentiful class means the donor never loses a class it
    was drawn with, and the receiver gets a single class, which keeps the label skew.
    """
    while True:
        sizes = [len(p) for p in parts]
        small = int(np.argmin(sizes))
        if sizes[small] >= min_size:
            return
        donor = parts[int(np.argmax(sizes))]
        labels = y[np.asarray(donor)]
        majority = int(np.bincount(labels).argmax())
        position = int(np.flatnonzero(labels == majority)[-1])
        parts[small].append(donor.pop(position))


def partition_dirichlet(
    y: NDArray[np.integer],
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = DEFAULT_MIN_SIZE,
) -> list[Indices]:
    """Label-skewed partition (Hsu et al. 2019) with at least ``min_size`` examples per client.

    Returns one sorted int64 index array per client; together they cover every index once.
    """
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be finite and > 0; got {alpha}")
    _check_clients(len(y), num_clients, min_size)
    parts = _dirichlet_draw(y, num_clients, alpha, rng)
    rebalance_min_size(parts, y, min_size)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def split_local(
    data: Dataset, eval_fraction: float, rng: np.random.Generator
) -> tuple[Dataset, Dataset]:
    """Shuffle a client's data into (train, eval) with ``max(1, round(eval_fraction * n))``
    eval examples; needs at least 2 examples so that both sides are non-empty."""
    n = len(data)
    if n < 2:
        raise ValueError(f"a client needs at least 2 examples to hold some out; got {n}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction}")
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    order = rng.permutation(n).astype(np.int64)
    return data.subset(np.sort(order[n_eval:])), data.subset(np.sort(order[:n_eval]))


def partition_indices(
    y: NDArray[np.integer],
    num_clients: int,
    spec: PartitionSpec,
    rng: np.random.Generator,
    min_size: int = DEFAULT_MIN_SIZE,
) -> list[Indices]:
    """Dispatch to ``partition_iid`` or ``partition_dirichlet``; every client gets >= min_size."""
    if spec.kind == "iid":
        _check_clients(len(y), num_clients, min_size)
        return partition_iid(y, num_clients, rng)
    if spec.alpha is None:
        raise ValueError("a dirichlet partition needs an alpha")
    return partition_dirichlet(y, num_clients, spec.alpha, rng, min_size)


def make_client_datasets(
    num_clients: int,
    partition: PartitionSpec | str,
    seed: int,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    test_seed: int = DEFAULT_TEST_SEED,
) -> tuple[list[ClientData], Dataset]:
    """Split digits into a global test set and ``num_clients`` clients, each with local
    train and held-out eval data.

    The global test set depends only on ``test_seed`` (not on ``seed``), so runs with
    different partition seeds are scored on the same examples. Deterministic in both seeds.
    """
    spec = parse_partition(partition) if isinstance(partition, str) else partition
    if min_size < 2:
        raise ValueError(
            f"min_size must be >= 2 so every client keeps an eval example; got {min_size}"
        )
    pool, test = train_test_split(
        load_digits_dataset(), test_fraction=test_fraction, seed=test_seed
    )
    rng = np.random.default_rng(seed)
    shards = partition_indices(pool.y, num_clients, spec, rng, min_size)
    clients = []
    for client_id, shard in enumerate(shards):
        local_train, local_eval = split_local(pool.subset(shard), eval_fraction, rng)
        clients.append(ClientData(client_id, local_train, local_eval))
    return clients, test
