"""Assembles the dashboard app: routers, validation-error reporting, metrics, the web page, the API docs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from federated_learning.dashboard.limits import BodyGuard, BodyTooLarge
from federated_learning.dashboard.live import EventHub
from federated_learning.dashboard.routes import (
    join_tokens,
    live,
    models,
    organisations,
    sync,
    system,
    trainings,
)
from federated_learning.services.runtime import SHUTDOWN_GRACE_S, ServiceContext, finish_within

STATIC = Path(__file__).parent / "static"
VENDOR_URL = "/static/vendor"
"""Third-party assets served from the package (``static/vendor``), so the page and ``/docs`` work offline."""


def _describe(errors: list[dict[str, object]]) -> str:
    parts = []
    for error in errors[:5]:
        loc = ".".join(str(p) for p in cast("Iterable[object]", error.get("loc", ())) if p != "body")
        parts.append(f"{loc or 'body'}: {error.get('msg')}")
    return "; ".join(parts)


def _add_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the vendored assets, readable without a key (the schema is public too)."""
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} - API",
            swagger_js_url=f"{VENDOR_URL}/swagger-ui-bundle.js", swagger_css_url=f"{VENDOR_URL}/swagger-ui.css",
            swagger_favicon_url=f"{VENDOR_URL}/favicon-32x32.png", oauth2_redirect_url=None)


def create_app(ctx: ServiceContext) -> FastAPI:
    """The dashboard over an open service context (its Redis client and settings)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub_task = asyncio.create_task(app.state.hub.run(ctx.stop))
        health_task = asyncio.create_task(ctx.health_loop())
        try:
            yield
        finally:
            ctx.stop.set()
            await asyncio.gather(finish_within(hub_task, SHUTDOWN_GRACE_S), finish_within(health_task, 1.0))

    app = FastAPI(title="Federated learning dashboard", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    app.state.hub = EventHub(ctx.redis, [cell.event_stream for cell in ctx.keys.cells])
    app.add_middleware(BodyGuard, ctx=ctx)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = _describe(list(exc.errors()))
        await ctx.reject("rest", "invalid_body", f"{request.method} {request.url.path}: {detail}")
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(StarletteHTTPException)
    async def unparsable_body(request: Request, exc: StarletteHTTPException) -> Response:
        """FastAPI answers a body its JSON parser cannot read (nested deeper than Python's
        recursion limit, say) with a bare 400: count it like every other refused body."""
        cause = exc.__cause__
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body" \
                and not isinstance(cause, BodyTooLarge):  # that one is refused (413) and counted already
            why = "JSON nested too deeply" if isinstance(cause, RecursionError) else "unreadable JSON"
            await ctx.reject("rest", "invalid_body", f"{request.method} {request.url.path}: {why}")
            return JSONResponse(status_code=422, content={"detail": why})
        return await http_exception_handler(request, exc)

    app.include_router(system.router)
    app.include_router(trainings.router)
    app.include_router(live.router)
    app.include_router(sync.router)
    app.include_router(models.router)
    app.include_router(join_tokens.router)
    app.include_router(organisations.router)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_docs(app)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app
