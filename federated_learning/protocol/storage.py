"""Where a deployment keeps its blobs: what the services publish and agents read when they start."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

BLOB_STORE_SCHEMA: Literal[1] = 1

BUCKET_NAME = r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$"
"""An S3 bucket name: 3 to 63 lowercase letters, digits, dots and hyphens."""
ENDPOINT_URL = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"


class BlobStoreDescriptor(BaseModel):
    """``redis``: blobs are keys of the deployment's Redis. ``folder``: files under ``path`` (an
    absolute path on the services' host; agents that see it elsewhere say where, ``bus/blob_stores.py``).
    ``s3``: objects in ``bucket`` of an S3-compatible object store (AWS S3 when ``endpoint_url`` is
    empty; MinIO and the like at their URL), under the deployment's prefix. A folder or a bucket
    holds ``store.json`` with ``store_id``, so that an agent can tell it found the right store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = BLOB_STORE_SCHEMA
    kind: Literal["redis", "folder", "s3"]
    path: str | None = None
    bucket: str | None = Field(default=None, pattern=BUCKET_NAME)
    endpoint_url: str | None = Field(default=None, pattern=ENDPOINT_URL, max_length=2048)
    region: str | None = Field(default=None, pattern=r"^[a-z0-9\-]{1,64}$")
    store_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")

    @model_validator(mode="after")
    def _fields_of_the_kind(self) -> BlobStoreDescriptor:
        folder = self.path is not None and self.path.startswith("/")
        s3_fields = (self.bucket, self.endpoint_url, self.region)
        valid = {
            "redis": self.path is None and self.store_id is None and s3_fields == (None, None, None),
            "folder": folder and self.store_id is not None and s3_fields == (None, None, None),
            "s3": self.path is None and self.store_id is not None and self.bucket is not None,
        }[self.kind]
        if not valid:
            raise ValueError("a folder store names an absolute path and its id, an s3 store its bucket and its "
                             "id (and may name an endpoint and a region), a redis store nothing")
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
