"""The object store's access control: with the agent's policy of docs/operations.md, enforced by
the S3 server, an agent reads models and writes its own uploads, again and again, but cannot
write another agent's prefix, tag its uploads (keep them) or delete; the services then keep,
read and delete its upload."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from federated_learning.bus.blob_objects import KEPT_TAG, ObjectBlobStore
from federated_learning.bus.blobs import BlobStoreError
from tests.conftest import s3_server

BUCKET = "fl-models"
PREFIX = "fl"
AGENT = "bot-17"
SETUP_REQUESTS = 7
"""Requests the server answers before it enforces its users' policies: the bucket, two users,
their policies and their keys."""


def agent_policy(agent_id: str) -> dict[str, Any]:
    """The agent's policy of docs/operations.md."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject",
         "Resource": [f"arn:aws:s3:::{BUCKET}/{PREFIX}/store.json", f"arn:aws:s3:::{BUCKET}/{PREFIX}/blob/*",
                      f"arn:aws:s3:::{BUCKET}/{PREFIX}/upload/{agent_id}/*"]},
        {"Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObjectTagging"],
         "Resource": f"arn:aws:s3:::{BUCKET}/{PREFIX}/upload/{agent_id}/*"},
        {"Effect": "Deny", "Action": "s3:PutObjectTagging", "Resource": f"arn:aws:s3:::{BUCKET}/*"},
    ]}


SERVICES_POLICY = {"Version": "2012-10-17", "Statement": [
    # The operator's own identity; this server authorises a DeleteObjects request against the
    # bucket under an action name of its own, so the services get every action here. The agent's
    # policy is the one this test is about.
    {"Effect": "Allow", "Action": "s3:*", "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]},
]}


@pytest.fixture(scope="module")
def enforcing() -> Iterator[tuple[str, dict[str, str], dict[str, str]]]:
    """An S3 server that enforces its users' policies: its URL, the services' and the agent's keys."""
    with s3_server(INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_REQUESTS)) as url:
        admin = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "admin",
                 "aws_secret_access_key": "admin"}
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **admin)
        keys = []
        for user, policy in (("services", SERVICES_POLICY), (AGENT, agent_policy(AGENT))):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="fl", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys.append({"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]})
        yield url, keys[0], keys[1]


def as_user(monkeypatch: pytest.MonkeyPatch, keys: dict[str, str]) -> None:
    for name, value in {**keys, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)


async def test_the_documented_policies_let_each_side_do_its_work_and_no_more(
        enforcing: tuple[str, dict[str, str], dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    url, services_keys, agent_keys = enforcing
    as_user(monkeypatch, services_keys)
    services = ObjectBlobStore.create(BUCKET, PREFIX, max_bytes=1 << 20, endpoint_url=url)
    model = await services.put(b"the global model")

    as_user(monkeypatch, agent_keys)
    agent = ObjectBlobStore(BUCKET, PREFIX, max_bytes=1 << 20, endpoint_url=url)
    assert agent.read_id() == services.store_id
    await agent.check_writable(AGENT)
    await agent.check_writable(AGENT)  # a restarted agent joins again
    assert await agent.get(model) == b"the global model"
    upload = await agent.put(b"an update", ttl_s=3600, owner=AGENT)
    assert await agent.put(b"an update", ttl_s=3600, owner=AGENT) == upload  # a retried upload
    with pytest.raises(BlobStoreError, match="AccessDenied"):
        await agent.put(b"a forged update", ttl_s=3600, owner="bot-18")
    with pytest.raises(BlobStoreError, match="AccessDenied"):
        await agent.keep([(upload, AGENT)])
    raw: Any = boto3.session.Session().client("s3", endpoint_url=url)  # the agent's keys, not a cached default
    with pytest.raises(ClientError, match="AccessDenied"):
        raw.delete_object(Bucket=BUCKET, Key=services.key(model))

    await services.keep([(upload, AGENT)])  # the services accept it
    assert services._client.get_object_tagging(Bucket=BUCKET, Key=services.key(upload, AGENT))["TagSet"] == [KEPT_TAG]
    assert await services.get(upload, owner=AGENT) == b"an update"
    await services.discard([(upload, AGENT)])
    assert not await services.exists(upload, owner=AGENT)
    agent.close()
    services.close()
