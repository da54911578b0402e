"""The aggregator's accepted updates, read whole as they are accepted and kept for their job.

The coordinator accepts an update after checking only its blob's header (size, format, layers:
decision 0012). The aggregator reads the accepted stream while the round still collects: each
blob is fetched once, its SHA-256 checked and its values validated on the worker threads. A
valid blob is kept in memory (within ``max_bytes``) for the round's job, which then neither
fetches nor hashes it again; an invalid one is reported to the coordinator
(:class:`~federated_learning.protocol.messages.UpdateRefused`), which counts the refusal and
withdraws the update while its round collects.

What is kept is only a head start: a job whose update is not here (another worker read it, the
process restarted, the budget was full) fetches and checks it as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from federated_learning.bus.blobs import BlobMissing, BlobStore
from federated_learning.protocol.messages import UpdateAccepted
from federated_learning.protocol.tensors import InvalidTensor, LayerSpec, decode_layers, spec_of
from federated_learning.protocol.updates import check_update
from federated_learning.records.versions import VersionIndex
from federated_learning.types import BlobDigest

log = logging.getLogger(__name__)

UploadKey = tuple[BlobDigest, str]
"""(digest, agent): an agent's upload."""
Verdict = bytes | BlobMissing | InvalidTensor | None
"""A checked blob's bytes, or why it is refused; None when it could not be read (a lost bus): whoever
waits for it fetches it."""

KEEP_FOR_S = 3600.0
"""Uploads of a round that never got its job (a training stopped) are dropped after this long."""
SPECS_KEPT = 8


@dataclass
class _Kept:
    training_id: str
    round: int
    verdict: asyncio.Future[Verdict]
    size: int
    at: float


class UpdateCache:
    """Accepted uploads, checked once, by (digest, agent)."""

    def __init__(self, blobs: BlobStore, versions: VersionIndex, *, max_bytes: int, max_blob_bytes: int) -> None:
        self._blobs = blobs
        self._versions = versions
        self.max_bytes = max_bytes
        self._max_blob_bytes = max_blob_bytes
        self._kept: dict[UploadKey, _Kept] = {}
        self._bytes = 0
        self._specs: dict[tuple[str, int], LayerSpec] = {}
        self._jobs_from: dict[str, int] = {}
        """training -> the newest round whose job this worker started: later reads of that round's
        (or an earlier one's) uploads are skipped, since the job reads and reports them itself."""

    @property
    def bytes_kept(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._kept)

    async def take(self, accepted: list[UpdateAccepted], executor: Executor
                   ) -> list[tuple[UpdateAccepted, BlobMissing | InvalidTensor]]:
        """Fetch and check the accepted uploads (concurrently, on ``executor``); keep the valid ones
        while the budget allows. Returns the refused ones with the reason."""
        self._drop_old(time.time())
        specs = [await self._spec(a.training_id, a.model_version) for a in accepted]
        loop = asyncio.get_running_loop()
        todo: list[tuple[UpdateAccepted, LayerSpec]] = []
        refused: list[tuple[UpdateAccepted, BlobMissing | InvalidTensor]] = []
        for notice, spec in zip(accepted, specs, strict=True):
            key = (notice.update_digest, notice.agent_id)
            known = self._kept.get(key)
            if known is not None:  # read already; refused again when the same bytes come again
                verdict = known.verdict.result() if known.verdict.done() else None
                if isinstance(verdict, (BlobMissing, InvalidTensor)):
                    refused.append((notice, verdict))
                continue
            if spec is None or notice.round <= self._jobs_from.get(notice.training_id, -1):
                continue  # no model to check it against, or its job started: the job checks it
            self._kept[key] = _Kept(notice.training_id, notice.round, loop.create_future(), 0, time.time())
            todo.append((notice, spec))

        def check(index: int, data: bytes) -> bytes:
            check_update(data, todo[index][1], max_bytes=self._max_blob_bytes)
            return data

        try:
            verdicts = await self._blobs.get_each([(n.update_digest, n.agent_id) for n, _ in todo], check,
                                                  executor=executor) if todo else []
        except BaseException:
            # Not read (the bus went away, say): forget them, and let a job waiting for one fetch it
            # itself; the entries stay pending and are read again.
            for notice, _spec in todo:
                kept = self._kept.pop((notice.update_digest, notice.agent_id), None)
                if kept is not None and not kept.verdict.done():
                    kept.verdict.set_result(None)
            raise
        for (notice, _spec), verdict in zip(todo, verdicts, strict=True):
            key = (notice.update_digest, notice.agent_id)
            kept = self._kept[key]
            kept.verdict.set_result(verdict)  # a job may be waiting for it
            if isinstance(verdict, (BlobMissing, InvalidTensor)):
                refused.append((notice, verdict))
            elif self._bytes + len(verdict) <= self.max_bytes:
                kept.size = len(verdict)
                self._bytes += kept.size
            else:
                del self._kept[key]  # over the budget: the job fetches it
        return refused

    def job_started(self, training_id: str, round_number: int) -> None:
        """The job of ``round_number`` reads its updates now: uploads of it (and of earlier rounds)
        that arrive on the accepted stream after this are left to it, so none is reported twice."""
        self._jobs_from[training_id] = max(round_number, self._jobs_from.get(training_id, -1))

    def get(self, key: UploadKey) -> asyncio.Future[Verdict] | None:
        """The upload's verdict (awaitable while it is being read), None when it is not kept."""
        kept = self._kept.get(key)
        return None if kept is None else kept.verdict

    def release(self, training_id: str, round_number: int) -> None:
        """The job of ``round_number`` is done: drop the training's uploads of it and earlier rounds."""
        for key, kept in list(self._kept.items()):
            if kept.training_id == training_id and kept.round <= round_number and kept.verdict.done():
                self._forget(key)

    def _forget(self, key: UploadKey) -> None:
        kept = self._kept.pop(key)
        self._bytes -= kept.size

    def _drop_old(self, now: float) -> None:
        for key, kept in list(self._kept.items()):
            if now - kept.at > KEEP_FOR_S and kept.verdict.done():
                self._forget(key)

    async def _spec(self, training_id: str, version: int) -> LayerSpec | None:
        """The layers of the model an update was trained from (None when that version is unknown)."""
        key = (training_id, version)
        if key in self._specs:
            return self._specs[key]
        record = await self._versions.get(training_id, version)
        if record is None:
            return None
        try:
            spec = spec_of(decode_layers(await self._blobs.get(record.model_digest), max_bytes=self._max_blob_bytes))
        except (BlobMissing, InvalidTensor):
            return None
        while len(self._specs) >= SPECS_KEPT:
            del self._specs[next(iter(self._specs))]
        self._specs[key] = spec
        return spec


def describe_refusal(exc: BlobMissing | InvalidTensor, digest: str) -> tuple[str, str]:
    """(reason, detail) of a refused upload, as counted and reported."""
    if isinstance(exc, InvalidTensor):
        return exc.reason, exc.detail
    return "blob_missing", f"no blob {digest}"

