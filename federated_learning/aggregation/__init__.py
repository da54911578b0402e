"""Pure aggregation rules for federated learning: arrays in, the next global model out.

Every rule is created by name with ``create_strategy`` and exposes ``aggregate`` (per-client
layer lists) and ``aggregate_slabs`` (updates already laid out as one ``(K, d_i)`` slab per
layer, see ``allocate_slabs``). Kernels are Numba-parallel and give the same bits for any
thread count; ``configure_threads`` sets that count.
"""

from .base import Strategy, UpdateBatch, allocate_slabs, fill_slabs
from .bulyan import Bulyan
from .fedavg import FedAvg, FedProx, FedSGD
from .fedavgm import FedAvgM
from .fedbuff import FedBuff
from .fedopt import FedAdagrad, FedAdam, FedYogi
from .krum import Krum, MultiKrum, pairwise_sq_distances
from .median import Median
from .perffedavg import PerFedAvg
from .registry import RULES, create_strategy
from .threads import configure_threads
from .trimmed_mean import TrimmedMean

__all__ = [
    "RULES",
    "Bulyan",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedProx",
    "FedSGD",
    "FedYogi",
    "Krum",
    "Median",
    "MultiKrum",
    "PerFedAvg",
    "Strategy",
    "TrimmedMean",
    "UpdateBatch",
    "allocate_slabs",
    "configure_threads",
    "create_strategy",
    "fill_slabs",
    "pairwise_sq_distances",
]
