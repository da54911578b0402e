"""Where a deployment keeps its blobs: what the services publish and agents read when they start."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

BLOB_STORE_SCHEMA: Literal[1] = 1


class BlobStoreDescriptor(BaseModel):
    """``redis``: blobs are keys of the deployment's Redis. ``folder``: files under ``path`` (an
    absolute path on the services' host; agents that see it elsewhere say where, ``bus/blob_stores.py``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = BLOB_STORE_SCHEMA
    kind: Literal["redis", "folder"]
    path: str | None = None

    @model_validator(mode="after")
    def _path_with_folder(self) -> BlobStoreDescriptor:
        if (self.kind == "folder") != (self.path is not None and self.path.startswith("/")):
            raise ValueError("a folder store names an absolute path; a redis store none")
        return self
