"""Organisations, their projects, and API keys, in Redis.

An organisation owns projects; a project owns trainings (and join tokens); an API key
belongs to one organisation with one role. Only the SHA-256 of a key is stored; the key
itself is returned once, by :meth:`Organisations.create_key`. The ``default``
organisation and its ``default`` project exist implicitly.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from federated_learning.access import (
    DEFAULT_ORG,
    DEFAULT_PROJECT,
    Principal,
    Role,
    api_key_id,
    check_slug,
    hash_api_key,
    is_expired,
    key_matches,
    new_api_key,
)
from federated_learning.protocol.keys import Keys
from federated_learning.records.join_tokens import JoinTokens


class Organisation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    org_id: str
    name: str = ""
    created_at: float = Field(default_factory=time.time)


class Project(BaseModel):
    model_config = ConfigDict(extra="forbid")
    org_id: str
    project_id: str
    name: str = ""
    created_at: float = Field(default_factory=time.time)


class ApiKeyRecord(BaseModel):
    """What is stored of a key: never the key, only its SHA-256."""

    model_config = ConfigDict(extra="forbid")
    key_id: str
    org_id: str
    role: Role
    name: str
    key_hash: str
    created_at: float = Field(default_factory=time.time)
    expires_at: float | None = None
    revoked_at: float | None = None

    @property
    def usable(self) -> bool:
        return self.revoked_at is None and not is_expired(self.expires_at)

    def public(self) -> dict[str, object]:
        """The record without its hash, for listings."""
        return {**self.model_dump(mode="json", exclude={"key_hash"}), "usable": self.usable}

    def principal(self) -> Principal:
        return Principal(key_id=self.key_id, name=self.name, role=self.role, org_id=self.org_id)


class UnknownOrganisation(LookupError):
    """An organisation (or project) that does not exist."""


class OrganisationExists(ValueError):
    """An organisation (or project) id that is taken."""


DEFAULT_ORGANISATION = Organisation(org_id=DEFAULT_ORG, name="default", created_at=0.0)


class Organisations:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    # -- organisations ----------------------------------------------------------

    async def create_org(self, org_id: str, name: str = "") -> Organisation:
        check_slug("organisation", org_id)
        record = Organisation(org_id=org_id, name=name or org_id)
        if org_id == DEFAULT_ORG or not await self._redis.hsetnx(
                self._keys.organisations, org_id, record.model_dump_json()):
            raise OrganisationExists(f"organisation '{org_id}' exists")
        return record

    async def get_org(self, org_id: str) -> Organisation | None:
        if org_id == DEFAULT_ORG:
            return DEFAULT_ORGANISATION
        raw = await self._redis.hget(self._keys.organisations, org_id)
        return None if raw is None else Organisation.model_validate_json(raw)

    async def all_orgs(self) -> list[Organisation]:
        raw = await self._redis.hgetall(self._keys.organisations)
        stored = sorted((Organisation.model_validate_json(v) for v in raw.values()), key=lambda o: o.org_id)
        return [DEFAULT_ORGANISATION, *stored]

    async def require_org(self, org_id: str) -> Organisation:
        org = await self.get_org(org_id)
        if org is None:
            raise UnknownOrganisation(f"no organisation '{org_id}'")
        return org

    # -- projects ---------------------------------------------------------------

    async def create_project(self, org_id: str, project_id: str, name: str = "") -> Project:
        await self.require_org(org_id)
        check_slug("project", project_id)
        record = Project(org_id=org_id, project_id=project_id, name=name or project_id)
        if project_id == DEFAULT_PROJECT or not await self._redis.hsetnx(
                self._keys.projects(org_id), project_id, record.model_dump_json()):
            raise OrganisationExists(f"project '{project_id}' exists in organisation '{org_id}'")
        return record

    async def get_project(self, org_id: str, project_id: str) -> Project | None:
        """A project; every existing organisation has the implicit ``default`` project."""
        if project_id == DEFAULT_PROJECT:
            return None if await self.get_org(org_id) is None else _default_project(org_id)
        raw = await self._redis.hget(self._keys.projects(org_id), project_id)
        return None if raw is None else Project.model_validate_json(raw)

    async def require_project(self, org_id: str, project_id: str) -> Project:
        project = await self.get_project(org_id, project_id)
        if project is None:
            raise UnknownOrganisation(f"no project '{project_id}' in organisation '{org_id}'")
        return project

    async def projects(self, org_id: str) -> list[Project]:
        raw = await self._redis.hgetall(self._keys.projects(org_id))
        stored = sorted((Project.model_validate_json(v) for v in raw.values()), key=lambda p: p.project_id)
        return [_default_project(org_id), *stored]

    async def delete_project(self, org_id: str, project_id: str) -> bool:
        """Forget a project and its join tokens (its trainings keep their project id; new trainings
        and new agents cannot use it)."""
        deleted = bool(await self._redis.hdel(self._keys.projects(org_id), project_id))
        if deleted:
            await JoinTokens(self._redis, self._keys).forget(
                lambda t: (t.org_id, t.project_id) == (org_id, project_id))
        return deleted

    # -- API keys ---------------------------------------------------------------

    async def create_key(self, org_id: str, role: Role, name: str,
                         expires_at: float | None = None) -> tuple[str, ApiKeyRecord]:
        """A new key of ``org_id`` (returned once) and its stored record."""
        await self.require_org(org_id)
        key, key_id = new_api_key()
        record = ApiKeyRecord(key_id=key_id, org_id=org_id, role=role, name=name,
                              key_hash=hash_api_key(key), expires_at=expires_at)
        await self._redis.hset(self._keys.api_keys, key_id, record.model_dump_json())
        return key, record

    async def authenticate(self, key: str) -> ApiKeyRecord | None:
        """The record of a presented key when it is known, unrevoked and unexpired; else None."""
        key_id = api_key_id(key)
        if key_id is None:
            return None
        record = await self.get_key(key_id)
        if record is None or not key_matches(key, record.key_hash) or not record.usable:
            return None
        return record

    async def get_key(self, key_id: str) -> ApiKeyRecord | None:
        raw = await self._redis.hget(self._keys.api_keys, key_id)
        return None if raw is None else ApiKeyRecord.model_validate_json(raw)

    async def keys(self, org_id: str | None = None) -> list[ApiKeyRecord]:
        """Keys of one organisation (every key when ``org_id`` is None), oldest first."""
        raw = await self._redis.hgetall(self._keys.api_keys)
        records = (ApiKeyRecord.model_validate_json(v) for v in raw.values())
        return sorted((r for r in records if org_id is None or r.org_id == org_id), key=lambda r: r.created_at)

    async def revoke_key(self, key_id: str, org_id: str | None = None) -> ApiKeyRecord | None:
        """Mark a key revoked (kept for the record); None when it is unknown or of another organisation."""
        record = await self.get_key(key_id)
        if record is None or (org_id is not None and record.org_id != org_id):
            return None
        if record.revoked_at is None:
            record = record.model_copy(update={"revoked_at": time.time()})
            await self._redis.hset(self._keys.api_keys, key_id, record.model_dump_json())
        return record


def _default_project(org_id: str) -> Project:
    return Project(org_id=org_id, project_id=DEFAULT_PROJECT, name="default", created_at=0.0)
