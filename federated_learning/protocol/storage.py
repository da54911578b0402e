"""Where a deployment keeps its blobs: what the services publish and agents read when they start."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

BLOB_STORE_SCHEMA: Literal[1] = 1


class BlobStoreDescriptor(BaseModel):
    """``redis``: blobs are keys of the deployment's Redis. ``folder``: files under ``path`` (an
    absolute path on the services' host; agents that see it elsewhere say where, ``bus/blob_stores.py``),
    whose ``store.json`` holds ``store_id``, so that an agent can tell it found the right folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = BLOB_STORE_SCHEMA
    kind: Literal["redis", "folder"]
    path: str | None = None
    store_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")

    @model_validator(mode="after")
    def _path_with_folder(self) -> BlobStoreDescriptor:
        folder = self.path is not None and self.path.startswith("/") and self.store_id is not None
        if (self.kind == "folder") != folder or (self.kind == "redis" and (self.path or self.store_id)):
            raise ValueError("a folder store names an absolute path and its id; a redis store neither")
        return self


def read_descriptor(raw: bytes | str | None) -> BlobStoreDescriptor | None:
    """The published descriptor; None when there is none, or one this version cannot read (an
    older or newer writer's): the coordinator publishes its own when it starts."""
    if raw is None:
        return None
    try:
        return BlobStoreDescriptor.model_validate_json(raw)
    except ValidationError:
        return None
