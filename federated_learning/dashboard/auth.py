"""API-key check for control endpoints (start, stop, rollback, acknowledge)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, status

from federated_learning.dashboard.deps import Context


async def require_api_key(
    ctx: Context,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """Accept ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``; else 401, nothing changes."""
    expected = ctx.settings.api_key
    given = x_api_key or (authorization.removeprefix("Bearer ").strip() if authorization else None)
    if not expected or not given or not hmac.compare_digest(given.encode(), expected.encode()):
        await ctx.reject("rest", "unauthorized", "missing or wrong API key")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="missing or wrong API key",
                            headers={"WWW-Authenticate": "Bearer"})


ApiKey = Annotated[None, Depends(require_api_key)]
