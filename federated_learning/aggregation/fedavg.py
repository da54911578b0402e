"""FedAvg, FedProx and FedSGD, and the weighted-sum kernel the other averaging rules share.

- FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", 2016, arXiv:1602.05629. New model = sum_k (n_k / n) w_k.
- FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", 2018,
  arXiv:1812.06127. The server side is FedAvg; ``proximal_mu`` is the weight of the
  proximal term (mu/2)||w - w_t||^2 in each agent's local objective.
- FedSGD (same paper as FedAvg): agents send gradients g_k; the server steps
  w <- w - lr * sum_k (n_k / n) g_k.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic
from numba.np.numpy_support import carray
from numpy.typing import NDArray

from federated_learning.numeric import all_finite

from .base import (
    Slab,
    Strategy,
    UpdateBatch,
    check_learning_rate,
    check_real,
    example_weights,
    outputs_like,
    raise_non_finite_input,
    slab_dtype,
)

WEIGHTED_SUM_BLOCK = 4096


OUTPUT_NOT_FINITE = 1
BASE_NOT_FINITE = 2


def pointer_of_address(typingctx, address, like):  # type: ignore[no-untyped-def]
    """Numba typing and code of ``address_as_pointer``: an int64 to a pointer (inttoptr)."""
    signature = types.CPointer(like.dtype)(address, like)  # type: ignore[no-untyped-call]

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


# address_as_pointer(address, like) inside a kernel: the int64 ``address`` as a pointer to
# ``like``'s dtype, for ``carray``. Typed Any: mypy cannot see through numba's intrinsic.
address_as_pointer: Any = intrinsic(pointer_of_address)


@njit(parallel=True, cache=True, nogil=True)
def weighted_sum_affine(  # type: ignore[no-untyped-def]
    addresses, like, weights, base, scale, base_coef, out, num_threads
):
    """out[c] = scale * sum_j weights[j] * x_j[c] + base_coef * base[c].

    addresses: (m,) int64 data addresses of m aligned, C-contiguous (d,) arrays x_j (slab
    rows or separate client arrays, kept alive by the caller); like: a 1-D array of the
    x_j's dtype (float32/float64; only its type is used); weights: (m,) float64; base, out:
    (d,), and ``out`` may be ``base`` (each coordinate is read, then written, by one thread:
    ``WeightedSum`` adds to its running sum so); num_threads: how many tasks (one float64
    accumulator block each, allocated once)
    to split the blocks among. Every x_j is read once, in place, one WEIGHTED_SUM_BLOCK of
    coordinates at a time, so no (m, d) copy is needed. Each coordinate is
    summed over j in order, in float64, by one thread, so the result does not depend on
    the thread count or on where the x_j live. Returns a bit set: OUTPUT_NOT_FINITE when
    an output is NaN or Inf, BASE_NOT_FINITE when an entry of base is. Checking base here,
    block by block while it is in cache and on every thread, replaces a serial pass over
    the global model.
    """
    d = out.size
    m = addresses.size
    num_blocks = (d + WEIGHTED_SUM_BLOCK - 1) // WEIGHTED_SUM_BLOCK
    num_tasks = max(1, min(num_blocks, num_threads))
    status = np.zeros(num_tasks, np.int64)
    for task in prange(num_tasks):
        acc = np.empty(WEIGHTED_SUM_BLOCK, np.float64)
        for b in range(task * num_blocks // num_tasks, (task + 1) * num_blocks // num_tasks):
            c0 = b * WEIGHTED_SUM_BLOCK
            n = min(d, c0 + WEIGHTED_SUM_BLOCK) - c0
            block = acc[:n]
            block[:] = 0.0
            # Four arrays per pass: four concurrent read streams, and the block is loaded
            # and stored once per four arrays instead of once per array. Unit-stride
            # slices (not 2-D indices) let LLVM vectorise the loop.
            j = 0
            while j + 4 <= m:
                x0 = carray(address_as_pointer(addresses[j], like), d)[c0 : c0 + n]
                x1 = carray(address_as_pointer(addresses[j + 1], like), d)[c0 : c0 + n]
                x2 = carray(address_as_pointer(addresses[j + 2], like), d)[c0 : c0 + n]
                x3 = carray(address_as_pointer(addresses[j + 3], like), d)[c0 : c0 + n]
                w0, w1, w2, w3 = weights[j], weights[j + 1], weights[j + 2], weights[j + 3]
                for c in range(n):
                    block[c] += (w0 * x0[c] + w1 * x1[c]) + (w2 * x2[c] + w3 * x3[c])
                j += 4
            while j < m:
                x0 = carray(address_as_pointer(addresses[j], like), d)[c0 : c0 + n]
                w0 = weights[j]
                for c in range(n):
                    block[c] += w0 * x0[c]
                j += 1
            target = out[c0 : c0 + n]
            if base_coef == 0.0:
                for c in range(n):
                    target[c] = scale * block[c]
            else:
                below = base[c0 : c0 + n]
                for c in range(n):
                    target[c] = scale * block[c] + base_coef * below[c]
            if not all_finite(target):
                status[task] |= OUTPUT_NOT_FINITE
            if not all_finite(base[c0 : c0 + n]):
                status[task] |= BASE_NOT_FINITE
    flags = 0
    for task in range(num_tasks):
        flags |= status[task]
    return flags


def update_addresses(
    batch: UpdateBatch, layer: int, rows: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.floating]]:
    """Data addresses of layer ``layer`` of updates ``rows`` (slab rows or the clients' own
    arrays), and an array of their dtype, as ``weighted_sum_affine`` takes them."""
    if batch.slabs:
        slab = batch.slabs[layer]
        # slab[0] (1-D, like a client's array): one compiled kernel serves slabs and arrays.
        return np.asarray(slab.ctypes.data + rows * slab.strides[0], dtype=np.int64), slab[0]
    arrays = [batch.client_arrays[int(k)][layer] for k in rows]
    addresses = np.fromiter((a.ctypes.data for a in arrays), dtype=np.int64, count=len(arrays))
    return addresses, arrays[0]


def flat_base(layer: NDArray[np.generic]) -> NDArray[np.floating]:
    """The global layer as a flat float32/float64 vector (a view when it already is one)."""
    return np.ascontiguousarray(np.reshape(layer, -1), dtype=slab_dtype(layer))


def weighted_combination(
    batch: UpdateBatch,
    weights: NDArray[np.float64],
    *,
    scale: float = 1.0,
    base_coef: float = 0.0,
    rows: NDArray[np.int64] | None = None,
    rule: str = "fedavg",
    outputs: list[NDArray[np.floating]] | None = None,
) -> list[NDArray[np.floating]]:
    """Per layer: ``scale * sum_j weights[j] * update[rows[j]] + base_coef * global``.

    outputs: flat per-layer arrays to write into (``outputs_like``); fresh ones when None.

    Raises ValueError when a global layer holds NaN/Inf (checked inside the kernel, so
    rules that call this for every layer set ``Strategy.checks_global_in_kernel``) or an
    update does: with weights > 0 (or any weight, as 0 * NaN is NaN) a non-finite input
    always reaches the output, so checking the O(d) output is equivalent to checking
    the O(K d) inputs.
    """
    chosen = np.arange(batch.num_clients, dtype=np.int64) if rows is None else rows
    threads = numba.get_num_threads()
    targets = outputs or outputs_like(batch.global_layers)
    for i, (layer, out) in enumerate(zip(batch.global_layers, targets, strict=True)):
        addresses, like = update_addresses(batch, i, chosen)
        flags = weighted_sum_affine(
            addresses, like, weights, flat_base(layer), float(scale), float(base_coef), out, threads
        )
        if flags & BASE_NOT_FINITE:
            raise ValueError(f"global layer {i} contains NaN or Inf")
        if flags & OUTPUT_NOT_FINITE:
            raise_non_finite_input(batch, rule)
    return targets


def fedavg(slabs: list[Slab], weights: NDArray[np.float64]) -> list[NDArray[np.floating]]:
    """Weighted mean of every layer's rows: ``sum_k weights[k] * slabs[i][k]`` (no checks)."""
    rows = np.arange(slabs[0].shape[0], dtype=np.int64)
    outputs = []
    for slab in slabs:
        out = np.empty(slab.shape[1], slab.dtype)
        addresses = slab.ctypes.data + rows * slab.strides[0]
        threads = numba.get_num_threads()
        weighted_sum_affine(addresses, slab[0], weights, out, 1.0, 0.0, out, threads)
        outputs.append(out)
    return outputs


class FedAvg(Strategy):
    """Example-weighted mean of the clients' models (Flower's FedAvg)."""

    name: ClassVar[str] = "fedavg"
    checks_global_in_kernel: ClassVar[bool] = True
    reads_client_arrays: ClassVar[bool] = True

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        return weighted_combination(batch, example_weights(batch.num_examples), rule=self.name)


class FedProx(FedAvg):
    """FedAvg on the server; ``proximal_mu`` is sent to the agents' local objective."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, proximal_mu: float) -> None:
        self.proximal_mu = check_real(
            self.name, "proximal_mu", proximal_mu, 0.0, float("inf"), low_open=False, high_open=True
        )

    def params(self) -> dict[str, object]:
        return {"proximal_mu": self.proximal_mu}


class FedSGD(Strategy):
    """Clients send gradients; the server takes one SGD step on their weighted mean."""

    name: ClassVar[str] = "fedsgd"
    checks_global_in_kernel: ClassVar[bool] = True
    reads_client_arrays: ClassVar[bool] = True

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        self.server_learning_rate = check_learning_rate(self.name, server_learning_rate)

    def params(self) -> dict[str, object]:
        return {"server_learning_rate": self.server_learning_rate}

    def aggregate_batch(self, batch: UpdateBatch) -> list[NDArray[np.floating]]:
        weights = example_weights(batch.num_examples)
        return weighted_combination(
            batch, weights, scale=-self.server_learning_rate, base_coef=1.0, rule=self.name
        )
