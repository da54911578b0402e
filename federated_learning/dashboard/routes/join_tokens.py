"""Join tokens for new agents, each issued for one project of the key's organisation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field

from federated_learning.access import DEFAULT_ORG, DEFAULT_PROJECT
from federated_learning.dashboard.auth import ApiKey, ensure_org, existing_project
from federated_learning.dashboard.deps import Agents, Context, Orgs
from federated_learning.protocol.messages import Identifier

router = APIRouter(prefix="/api", tags=["agents"])


class JoinTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field(default="", max_length=200)
    max_uses: int | None = Field(default=None, ge=1, le=1_000_000)
    project_id: Identifier = DEFAULT_PROJECT
    org_id: Identifier | None = Field(default=None, description="the bootstrap key only: the organisation")
    expires_in_s: float | None = Field(default=None, gt=0, le=366 * 86400)


@router.post("/join-tokens", status_code=status.HTTP_201_CREATED)
async def create_join_token(body: JoinTokenRequest, ctx: Context, agents: Agents, orgs: Orgs,
                            principal: ApiKey) -> dict[str, Any]:
    """A token for new agents of one project (shown once; only its hash is stored)."""
    org_id = body.org_id or principal.org_id or DEFAULT_ORG
    await ensure_org(ctx, principal, org_id)
    await existing_project(orgs, org_id, body.project_id)
    token, record = await agents.tokens.create(body.label, body.max_uses, org_id=org_id,
                                               project_id=body.project_id, ttl_s=body.expires_in_s)
    return {"token": token, **record.model_dump()}


@router.get("/join-tokens")
async def list_join_tokens(agents: Agents, principal: ApiKey) -> list[dict[str, Any]]:
    """The key's organisation's tokens (their hashes and uses left, never the tokens)."""
    return [token.model_dump() for token in await agents.tokens.all(principal.org_id)]


@router.delete("/join-tokens/{token_id}")
async def revoke_join_token(token_id: str, agents: Agents, principal: ApiKey) -> dict[str, str]:
    if not await agents.tokens.revoke(token_id, principal.org_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no join token '{token_id}'")
    return {"token_id": token_id, "status": "revoked"}
