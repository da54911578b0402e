"""Organisations, their projects and their API keys.

Creating an organisation needs the deployment's bootstrap key; an organisation's admins
manage its projects and keys; its viewers may list its projects. A new key is shown once.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field

from federated_learning.access import Principal, Role
from federated_learning.dashboard.auth import Admin, SuperAdmin, Viewer, ensure_org
from federated_learning.dashboard.deps import Context, Orgs
from federated_learning.records.organisations import (
    Organisation,
    OrganisationExists,
    Project,
    UnknownOrganisation,
)

router = APIRouter(prefix="/api/orgs", tags=["organisations"])

MAX_KEY_LIFETIME_S = 5 * 366 * 86400


class OrganisationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    org_id: str = Field(min_length=1, max_length=32)
    name: str = Field(default="", max_length=200)


class ProjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project_id: str = Field(min_length=1, max_length=32)
    name: str = Field(default="", max_length=200)


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    role: Role
    expires_in_s: float | None = Field(default=None, gt=0, le=MAX_KEY_LIFETIME_S)


async def _org(ctx: Context, orgs: Orgs, principal: Principal, org_id: str) -> Organisation:
    """The organisation in the path: 403 when it is not the key's, 404 when it does not exist."""
    await ensure_org(ctx, principal, org_id)
    try:
        return await orgs.require_org(org_id)
    except UnknownOrganisation as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc


@router.post("", status_code=status.HTTP_201_CREATED, response_model=Organisation)
async def create_organisation(body: OrganisationRequest, orgs: Orgs, _super: SuperAdmin) -> Organisation:
    try:
        return await orgs.create_org(body.org_id, body.name)
    except OrganisationExists as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc


@router.get("", response_model=list[Organisation])
async def list_organisations(orgs: Orgs, principal: Viewer) -> list[Organisation]:
    """Every organisation for the bootstrap key; the key's own otherwise."""
    return [org for org in await orgs.all_orgs() if principal.may_access(org.org_id)]


@router.post("/{org_id}/projects", status_code=status.HTTP_201_CREATED, response_model=Project)
async def create_project(org_id: str, body: ProjectRequest, ctx: Context, orgs: Orgs, principal: Admin) -> Project:
    await _org(ctx, orgs, principal, org_id)
    try:
        return await orgs.create_project(org_id, body.project_id, body.name)
    except OrganisationExists as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc


@router.get("/{org_id}/projects", response_model=list[Project])
async def list_projects(org_id: str, ctx: Context, orgs: Orgs, principal: Viewer) -> list[Project]:
    await _org(ctx, orgs, principal, org_id)
    return await orgs.projects(org_id)


@router.delete("/{org_id}/projects/{project_id}")
async def delete_project(org_id: str, project_id: str, ctx: Context, orgs: Orgs, principal: Admin) -> dict[str, str]:
    """Forget a project: its trainings stay; no new training or join token can name it."""
    await _org(ctx, orgs, principal, org_id)
    if not await orgs.delete_project(org_id, project_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no project '{project_id}' in '{org_id}'")
    return {"org_id": org_id, "project_id": project_id, "status": "deleted"}


@router.post("/{org_id}/keys", status_code=status.HTTP_201_CREATED)
async def create_key(org_id: str, body: KeyRequest, ctx: Context, orgs: Orgs, principal: Admin) -> dict[str, Any]:
    """A new API key of the organisation: the key is in this answer only (only its hash is stored)."""
    await _org(ctx, orgs, principal, org_id)
    expires_at = None if body.expires_in_s is None else time.time() + body.expires_in_s
    key, record = await orgs.create_key(org_id, body.role, body.name, expires_at)
    return {"api_key": key, **record.public()}


@router.get("/{org_id}/keys")
async def list_keys(org_id: str, ctx: Context, orgs: Orgs, principal: Admin) -> list[dict[str, Any]]:
    await _org(ctx, orgs, principal, org_id)
    return [record.public() for record in await orgs.keys(org_id)]


@router.delete("/{org_id}/keys/{key_id}")
async def revoke_key(org_id: str, key_id: str, ctx: Context, orgs: Orgs, principal: Admin) -> dict[str, Any]:
    """Revoke a key at once (its record stays, marked ``revoked_at``)."""
    await _org(ctx, orgs, principal, org_id)
    record = await orgs.revoke_key(key_id, org_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no key '{key_id}' in '{org_id}'")
    return record.public()
