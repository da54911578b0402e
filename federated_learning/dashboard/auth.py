"""Who is calling: API keys to principals, roles to permissions, organisations to boundaries.

Thin FastAPI dependencies over :mod:`federated_learning.access` (the pure rules) and
:mod:`federated_learning.records.organisations` (the stored keys). A missing, wrong,
revoked or expired key is a 401; a valid key without the permission, or reaching into
another organisation, is a 403. Both are counted and reported as rejected inputs, and
nothing changes.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, NoReturn

from fastapi import Depends, Header, HTTPException, Request, status

from federated_learning.access import SUPER_ADMIN, Permission, Principal, org_of_training
from federated_learning.dashboard.deps import Context, Trainings
from federated_learning.records.organisations import Organisations, UnknownOrganisation
from federated_learning.services.runtime import ServiceContext


def presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    """The key of ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``."""
    if x_api_key:
        return x_api_key
    if authorization and authorization.startswith("Bearer "):
        return authorization.removeprefix("Bearer ").strip() or None
    return None


async def principal_for(ctx: ServiceContext, key: str | None) -> Principal | None:
    """The deployment's bootstrap key is the super-admin; a stored, usable key is its holder; else None."""
    if not key:
        return None
    bootstrap = ctx.settings.api_key
    if bootstrap and hmac.compare_digest(key.encode(), bootstrap.encode()):
        return SUPER_ADMIN
    record = await Organisations(ctx.redis, ctx.keys).authenticate(key)
    return None if record is None else record.principal()


async def authenticate(
    ctx: Context,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    """The caller's principal; 401 (nothing changes) for a missing, wrong, revoked or expired key."""
    principal = await principal_for(ctx, presented_key(x_api_key, authorization))
    if principal is None:
        await ctx.reject("rest", "unauthorized", "missing, wrong, revoked or expired API key")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="missing, wrong, revoked or expired API key",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


async def forbid(ctx: ServiceContext, principal: Principal, detail: str) -> NoReturn:
    """Count and report a refused call, then answer 403."""
    await ctx.reject("rest", "forbidden", f"key '{principal.key_id}': {detail}")
    raise HTTPException(status.HTTP_403_FORBIDDEN, detail=detail)


async def ensure_org(ctx: ServiceContext, principal: Principal, org_id: str) -> None:
    """403 unless the key may act on organisation ``org_id``."""
    if not principal.may_access(org_id):
        await forbid(ctx, principal, f"organisation '{org_id}' is not this key's organisation")


async def existing_project(orgs: Organisations, org_id: str, project_id: str) -> None:
    """404 unless the organisation has the project."""
    try:
        await orgs.require_project(org_id, project_id)
    except UnknownOrganisation as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc


def require(permission: Permission) -> Callable[[ServiceContext, Principal], Awaitable[Principal]]:
    """A dependency that authenticates the caller and checks its role grants ``permission``."""

    async def check(ctx: Context, principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.allows(permission):
            await forbid(ctx, principal, f"role '{principal.role.value}' lacks the '{permission.value}' permission")
        return principal

    return check


_read = require(Permission.READ)
_control = require(Permission.CONTROL)
_manage = require(Permission.MANAGE)
_create_org = require(Permission.CREATE_ORG)

Viewer = Annotated[Principal, Depends(_read)]
Operator = Annotated[Principal, Depends(_control)]
Admin = Annotated[Principal, Depends(_manage)]
SuperAdmin = Annotated[Principal, Depends(_create_org)]
ApiKey = Operator
"""Control endpoints (start, stop, rollback, acknowledge, join tokens, HTTP sync)."""


async def confine_to_training_org(request: Request, ctx: Context, principal: Viewer, trainings: Trainings) -> None:
    """Router dependency: a ``{training_id}`` in the path must belong to the key's organisation.

    The stored training names its organisation; an id that names no training yet is judged
    by its ``<org>.`` prefix, so a foreign id is a 403 whether or not it exists.
    """
    training_id = request.path_params.get("training_id")
    if training_id is None or principal.is_super:
        return
    state = await trainings.get(training_id)
    org_id = state.org_id if state is not None else org_of_training(training_id)
    if not principal.may_access(org_id):
        await forbid(ctx, principal, f"training '{training_id}' belongs to another organisation")
