"""The object-store blob store (``bus/blob_objects.py``) against an S3 server over HTTP: written
once, verified on every read, expiring like Redis keys, swept, and no key outside its prefix."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import numpy as np
import pytest

from federated_learning.bus.blob_objects import EXPIRES, KEPT_TAG, SWEEP_MIN_AGE_S, ObjectBlobStore
from federated_learning.bus.blobs import HEAD_PROBE_BYTES, BlobMissing, BlobStoreError
from federated_learning.protocol.storage import BlobStoreDescriptor
from federated_learning.protocol.tensors import InvalidTensor, digest_of, encode_layers

AGENT = "agent-001"
PREFIX = "fl"


@pytest.fixture
def store(s3_endpoint: str, s3_bucket: str) -> Any:
    created = ObjectBlobStore.create(s3_bucket, PREFIX, max_bytes=1 << 22, endpoint_url=s3_endpoint)
    yield created
    created.close()


@pytest.fixture
def s3(s3_endpoint: str, s3_bucket: str) -> Any:
    """A plain S3 client: what someone else with access to the bucket could do."""
    return boto3.session.Session().client("s3", endpoint_url=s3_endpoint)


def set_expiry(s3: Any, store: ObjectBlobStore, digest: str, expires_at: float) -> None:
    """Give a stored upload another expiry (its metadata), keeping its bytes and tags."""
    key = store.key(digest, AGENT)
    s3.copy_object(Bucket=store.bucket, Key=key, CopySource={"Bucket": store.bucket, "Key": key},
                   Metadata={EXPIRES: str(int(expires_at))}, MetadataDirective="REPLACE", TaggingDirective="COPY")


async def test_a_blob_reads_back_under_its_prefix_and_is_described_by_its_bucket(
        store: ObjectBlobStore, s3: Any, s3_endpoint: str, s3_bucket: str) -> None:
    digest = await store.put(b"model bytes")
    assert digest == digest_of(b"model bytes")
    assert await store.get(digest) == b"model bytes"
    assert await store.exists(digest) and not await store.exists(digest, owner=AGENT)
    assert store.key(digest) == f"{PREFIX}/blob/{digest}"
    assert store.key(digest, AGENT) == f"{PREFIX}/upload/{AGENT}/{digest}"
    assert store.describe() == BlobStoreDescriptor(kind="s3", bucket=s3_bucket, endpoint_url=s3_endpoint,
                                                   store_id=store.store_id)
    assert s3.head_object(Bucket=s3_bucket, Key=store.key(digest))["Metadata"] == {}  # never expires
    again = ObjectBlobStore.create(s3_bucket, PREFIX, max_bytes=1024, endpoint_url=s3_endpoint)
    assert again.store_id == store.store_id  # the first service's id, read by the next
    other = ObjectBlobStore(s3_bucket, "other", max_bytes=1024, endpoint_url=s3_endpoint)
    assert other.read_id() is None  # no deployment under that prefix
    again.close()
    other.close()


async def test_an_upload_expires_unless_kept(store: ObjectBlobStore, s3: Any) -> None:
    before = time.time()
    digest = await store.put(b"an update", ttl_s=60, owner=AGENT)
    expires_at = int(s3.head_object(Bucket=store.bucket, Key=store.key(digest, AGENT))["Metadata"][EXPIRES])
    assert before + 59 <= expires_at <= time.time() + 60
    assert await store.get(digest, owner=AGENT) == b"an update"

    set_expiry(s3, store, digest, time.time() - 1)
    with pytest.raises(BlobMissing, match="expired"):
        await store.get(digest, owner=AGENT)
    assert await store.heads([(digest, AGENT)]) == {}
    assert not await store.exists(digest, owner=AGENT)
    assert await store.put(b"an update", ttl_s=60, owner=AGENT) == digest  # an expired copy is written again
    assert await store.get(digest, owner=AGENT) == b"an update"

    kept = await store.put(b"kept update", ttl_s=60, owner=AGENT)
    await store.keep([(kept, AGENT), (digest_of(b"never uploaded"), AGENT)])  # a missing one is skipped
    assert s3.get_object_tagging(Bucket=store.bucket, Key=store.key(kept, AGENT))["TagSet"] == [KEPT_TAG]
    set_expiry(s3, store, kept, time.time() - 1)
    assert await store.get(kept, owner=AGENT) == b"kept update"  # past its expiry, but kept
    assert await store.put(b"kept update", ttl_s=60, owner=AGENT) == kept  # a kept copy is left alone
    assert s3.get_object_tagging(Bucket=store.bucket, Key=store.key(kept, AGENT))["TagSet"] == [KEPT_TAG]
    set_expiry(s3, store, kept, time.time() + 3600)
    assert await store.put(b"kept update", ttl_s=60, owner=AGENT) == kept  # a live copy is left alone
    assert s3.get_object_tagging(Bucket=store.bucket, Key=store.key(kept, AGENT))["TagSet"] == [KEPT_TAG]


async def test_an_organisations_model_and_a_bad_expiry_neither_expire_early_nor_break_a_reader(
        store: ObjectBlobStore, s3: Any) -> None:
    """A blob owned without expiry (an organisation's model) is kept from the start; an expiry an
    agent wrote that is no number, or an absurd one, counts as none (a day after writing)."""
    model = await store.put(b"an organisation's model", owner="_models.acme")
    assert s3.get_object_tagging(Bucket=store.bucket, Key=store.key(model, "_models.acme"))["TagSet"] == [KEPT_TAG]
    odd, huge = digest_of(b"odd"), digest_of(b"huge")
    s3.put_object(Bucket=store.bucket, Key=store.key(odd, AGENT), Body=b"odd", Metadata={EXPIRES: "soon"})
    s3.put_object(Bucket=store.bucket, Key=store.key(huge, AGENT), Body=b"huge", Metadata={EXPIRES: "9" * 400})
    assert await store.get(odd, owner=AGENT) == b"odd" and await store.get(huge, owner=AGENT) == b"huge"
    assert set(await store.heads([(odd, AGENT), (huge, AGENT)])) == {(odd, AGENT), (huge, AGENT)}
    assert store.sweep_expired_now(time.time() + 25 * 3600) == 2
    assert await store.get(model, owner="_models.acme") == b"an organisation's model"


async def test_an_upload_lives_a_day_at_most_whatever_its_metadata_says(store: ObjectBlobStore, s3: Any) -> None:
    """An agent that writes with its own S3 client, without the expiry or with one years ahead,
    does not keep its upload alive: the sweep takes it a day after it was written."""
    raw, far = digest_of(b"raw upload"), digest_of(b"far upload")
    s3.put_object(Bucket=store.bucket, Key=store.key(raw, AGENT), Body=b"raw upload")
    s3.put_object(Bucket=store.bucket, Key=store.key(far, AGENT), Body=b"far upload",
                  Metadata={EXPIRES: str(int(time.time() + 10 * 365 * 86400))})
    assert await store.get(raw, owner=AGENT) == b"raw upload" and await store.get(far, owner=AGENT) == b"far upload"
    assert store.sweep_expired_now(time.time() + 3600) == 0
    assert store.sweep_expired_now(time.time() + 25 * 3600) == 2
    assert not await store.exists(raw, owner=AGENT) and not await store.exists(far, owner=AGENT)


async def test_the_sweep_deletes_old_uploads_past_their_expiry_and_nothing_else(
        store: ObjectBlobStore, s3: Any) -> None:
    expired = await store.put(b"expired", ttl_s=60, owner=AGENT)
    kept = await store.put(b"kept", ttl_s=60, owner=AGENT)
    fresh = await store.put(b"fresh", ttl_s=3 * 3600, owner=AGENT)
    model = await store.put(b"model")
    await store.keep([(kept, AGENT)])
    s3.put_object(Bucket=store.bucket, Key=f"{PREFIX}/upload/{AGENT}/not-a-digest", Body=b"someone's file")
    for digest in (expired, kept):
        set_expiry(s3, store, digest, time.time() - 1)

    assert store.sweep_expired_now(time.time()) == 0  # too young to be looked at
    later = time.time() + SWEEP_MIN_AGE_S + 1
    assert store.sweep_expired_now(later) == 1
    assert not await store.exists(expired, owner=AGENT)
    assert await store.get(kept, owner=AGENT) == b"kept" and await store.get(fresh, owner=AGENT) == b"fresh"
    assert store.sweep_expired_now(later) == 0  # each old upload's expiry is read once
    assert store.sweep_expired_now(time.time() + 4 * 3600) == 1  # the fresh one's turn
    assert await store.get(model) == b"model"
    assert s3.head_object(Bucket=store.bucket, Key=f"{PREFIX}/upload/{AGENT}/not-a-digest")
    await store.discard([(kept, AGENT), (model, None), (digest_of(b"never stored"), None)])
    assert not await store.exists(kept, owner=AGENT) and not await store.exists(model)
    assert store.sweep_expired_now(time.time() + 25 * 3600) == 1  # a key no blob has, once a day old
    assert await store.sweep_expired() == 0


async def test_bad_blobs_are_refused_with_their_reason(store: ObjectBlobStore, s3: Any) -> None:
    with pytest.raises(InvalidTensor, match="exceeds the limit"):
        await store.put(b"x" * (store.max_bytes + 1))
    with pytest.raises(BlobMissing):
        await store.get(digest_of(b"never stored"))
    with pytest.raises(BlobMissing):
        await store.head(digest_of(b"never stored"), owner=AGENT)

    digest = await store.put(b"honest", ttl_s=60, owner=AGENT)
    s3.put_object(Bucket=store.bucket, Key=store.key(digest, AGENT), Body=b"tampered",
                  Metadata={EXPIRES: str(int(time.time() + 60))})  # the key stays, the bytes change
    with pytest.raises(InvalidTensor) as tampered:
        await store.get(digest, owner=AGENT)
    assert tampered.value.reason == "hash_mismatch"

    oversized = digest_of(b"big")
    s3.put_object(Bucket=store.bucket, Key=store.key(oversized, AGENT), Body=b"x" * (store.max_bytes + 1))
    with pytest.raises(InvalidTensor) as too_large:
        await store.head(oversized, owner=AGENT)
    assert too_large.value.reason == "too_large"

    good = await store.put(b"good", ttl_s=60, owner=AGENT)
    missing = digest_of(b"missing")

    def then(index: int, data: bytes) -> bytes:
        if data == b"good" and index == 3:
            raise InvalidTensor("bad_layout", "refused by the reader")
        return data

    with ThreadPoolExecutor(4) as executor:
        results = await store.get_each([(good, AGENT), (digest, AGENT), (oversized, AGENT), (good, AGENT),
                                        (missing, AGENT)], then, executor=executor)
    assert results[0] == b"good"
    assert isinstance(results[1], InvalidTensor) and results[1].reason == "hash_mismatch"
    assert isinstance(results[2], InvalidTensor) and results[2].reason == "too_large"
    assert isinstance(results[3], InvalidTensor) and results[3].reason == "bad_layout"
    assert isinstance(results[4], BlobMissing)


async def test_a_header_longer_than_the_probe_is_read_whole(store: ObjectBlobStore) -> None:
    layers = {f"block{k:04d}.a_rather_long_layer_name.weight": np.zeros(2, np.float32) for k in range(400)}
    blob = encode_layers(layers)
    digest = await store.put(blob, ttl_s=60, owner=AGENT)
    head = await store.head(digest, owner=AGENT)
    assert head.size == len(blob) and len(head.head) > HEAD_PROBE_BYTES
    assert (await store.heads([(digest, AGENT), (digest_of(b"gone"), AGENT)])) == {(digest, AGENT): head}
    empty = await store.put(b"", ttl_s=60, owner=AGENT)
    assert (await store.head(empty, owner=AGENT)).size == 0


def test_no_key_leaves_the_prefix(store: ObjectBlobStore) -> None:
    """The stores share their name rules (``bus/blobs.py``; every case in test_blob_files.py)."""
    with pytest.raises(ValueError, match="not a SHA-256"):
        store.key("../" + "a" * 61)
    with pytest.raises(ValueError, match="cannot own blobs"):
        store.key("a" * 64, "../agent")


async def test_a_store_that_cannot_be_reached_is_a_store_error(s3_endpoint: str, s3_bucket: str) -> None:
    with pytest.raises(BlobStoreError, match="NoSuchBucket"):
        ObjectBlobStore.create("no-such-bucket", PREFIX, max_bytes=1024, endpoint_url=s3_endpoint)
    store = ObjectBlobStore(s3_bucket, PREFIX, max_bytes=1024, endpoint_url="http://127.0.0.1:9")
    with pytest.raises(BlobStoreError, match="cannot store blob"):
        await store.check_writable(AGENT)
    with pytest.raises(BlobStoreError):
        store.read_id()
    store.close()


def test_stores_of_one_identity_share_a_client_and_another_identity_gets_its_own(
        s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """69 agents of one process would otherwise load the S3 model 69 times (about 13 MB each)."""
    first = ObjectBlobStore(s3_bucket, PREFIX, max_bytes=1024, endpoint_url=s3_endpoint)
    second = ObjectBlobStore(s3_bucket, "other", max_bytes=1024, endpoint_url=s3_endpoint)
    assert first._client is second._client
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key")
    other = ObjectBlobStore(s3_bucket, PREFIX, max_bytes=1024, endpoint_url=s3_endpoint)
    assert other._client is not first._client
    other.close()
    first.close()
    first.close()  # a second close changes nothing
    assert second.read_id() is None  # the client lives on while a store still uses it
    users = second._connection.users
    second.close()
    assert second._connection.users == users - 1
