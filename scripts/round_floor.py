"""The data-path floor of a round: this design's data path for N x d measured alone, on this
machine, with no protocol around it (no bus, messages, signatures, state or transactions).

One round of the floor, on a pool of as many threads as this process may use:
- per agent: the synthetic trainer's fit (``agents/synthetic.py``), the upload encoded as
  safetensors, its SHA-256 (which names it), and the bytes written into a new file in the agent's
  folder;
- per upload, as soon as it is written: the file read, its SHA-256 checked (which binds it to what
  the agent signed), decoded, and folded into the sum weighted by example counts (each synthetic
  agent reports 1; ``aggregation.streaming.WeightedSum``, ``FOLDED_GROUP`` at a time, as the
  aggregator folds);
- then the new model: the mean encoded, hashed, written and fsynced (a committed version is
  durable), and read back and hash-checked once (the agents of one process share each model).

``scripts/benchmark-rounds.py`` runs it in the same run as the deployed system and Flower and
prints both against it. It is a reference, not a bound on every design: a data path with fewer
copies would cost a little less; the two SHA-256 passes and the file write and read it keeps are
what the design's safety rules ask of every upload.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from agents.synthetic import initial_model, step
from federated_learning.aggregation.streaming import WeightedSum
from federated_learning.protocol.tensors import decode_layers, digest_of, encode_layers
from federated_learning.services.job_updates import FOLDED_GROUP

MAX_BLOB_BYTES = 1 << 40
Model = dict[str, np.ndarray]


def cpu_seconds() -> float:
    """User and system CPU seconds of this process, all threads."""
    times = os.times()
    return times.user + times.system


def _upload(folder: Path, model: Model, agent: str, server_round: int) -> tuple[Path, str]:
    delta = step(agent, server_round)
    data = encode_layers({name: layer + delta for name, layer in model.items()})
    digest = digest_of(data)
    path = folder / agent / digest  # a folder per agent, as the blob store's: two agents may upload equal bytes
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _write_all(descriptor, data)
    finally:
        os.close(descriptor)
    return path, digest


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]


def read_checked(path: Path, digest: str) -> Model:
    """The layers of the file at ``path``; RuntimeError when its bytes do not hash to ``digest``."""
    data = path.read_bytes()
    if digest_of(data) != digest:
        raise RuntimeError(f"{path} does not hash to its name")
    return dict(decode_layers(data, max_bytes=MAX_BLOB_BYTES))


def _round(pool: ThreadPoolExecutor, folder: Path, model: Model, agents: list[str], server_round: int) -> None:
    uploads = [pool.submit(_upload, folder, model, agent, server_round) for agent in agents]
    reads: list[Future[Model]] = []
    for upload in uploads:
        path, digest = upload.result()
        reads.append(pool.submit(read_checked, path, digest))
    total = WeightedSum(list(model.values()))
    for first in range(0, len(reads), FOLDED_GROUP):
        group = [read.result() for read in reads[first:first + FOLDED_GROUP]]
        total.add([list(update.values()) for update in group], [1.0] * len(group))
    data = encode_layers({name: value.reshape(layer.shape)
                          for (name, layer), value in zip(model.items(), total.mean(), strict=True)})
    digest = digest_of(data)
    model_path = folder / f"model-{digest}"
    descriptor = os.open(model_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _write_all(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    read_checked(model_path, digest)
    for upload in uploads:
        upload.result()[0].unlink()
    model_path.unlink()


def measure_floor(*, agents: int, params: int, layers: int, rounds: int, folder: Path,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Seconds and CPU seconds per round (medians over rounds >= 2) of ``rounds`` floor rounds of
    ``agents`` uploads of a ``params``-value model in ``layers`` layers, through files in
    ``folder`` (emptied, then removed)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model: Model = dict(initial_model(params, layers))
    names = [f"floor-{index:05d}" for index in range(agents)]
    for name in names:
        (folder / name).mkdir()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    walls, cpus = [], []
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="floor") as pool:
            for server_round in range(1, rounds + 1):
                started, cpu_started = time.perf_counter(), cpu_seconds()
                _round(pool, folder, model, names, server_round)
                walls.append(time.perf_counter() - started)
                cpus.append(cpu_seconds() - cpu_started)
                if log is not None:
                    log(f"floor round {server_round}: {walls[-1]:.3f} s, {cpus[-1]:.3f} CPU-s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    later = slice(1, None) if rounds > 1 else slice(None)
    return {"s_per_round": statistics.median(walls[later]), "cpu_s_per_round": statistics.median(cpus[later]),
            "threads": threads, "rounds": walls}
