"""Checkpoints on disk: safetensors plus JSON metadata, each written atomically.

Write to a temporary file in the same folder, fsync it, rename it over the target,
then fsync the folder: a reader sees the old file or the new one, never a torn one,
and a crash after the rename keeps it.
"""

from __future__ import annotations

import os
from pathlib import Path

from federated_learning.protocol.tensors import InvalidTensor, digest_of


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class CheckpointStore:
    """``<root>/<training>/v<version>.safetensors`` and ``.json`` beside it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def model_path(self, training_id: str, version: int) -> Path:
        return self.root / training_id / f"v{version:06d}.safetensors"

    def metadata_path(self, training_id: str, version: int) -> Path:
        return self.model_path(training_id, version).with_suffix(".json")

    def write(self, training_id: str, version: int, model: bytes, metadata_json: str) -> Path:
        path = self.model_path(training_id, version)
        atomic_write(path, model)
        atomic_write(self.metadata_path(training_id, version), metadata_json.encode())
        return path

    def delete(self, training_id: str, version: int) -> None:
        """Remove the checkpoint's model file (its metadata JSON stays for the lineage)."""
        self.model_path(training_id, version).unlink(missing_ok=True)

    def read(self, training_id: str, version: int, expected_digest: str) -> bytes:
        """The checkpoint's bytes; ``InvalidTensor('hash_mismatch')`` if they are not what was committed."""
        data = self.model_path(training_id, version).read_bytes()
        if digest_of(data) != expected_digest:
            raise InvalidTensor("hash_mismatch",
                                f"checkpoint {training_id} v{version} fails its hash; not served")
        return data
