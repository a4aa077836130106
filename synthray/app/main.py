"""The FastAPI application: versioned REST API under /v1, health probes at the root."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

from synthray import __version__
from synthray.app import ratelimit, storage, storecheck
from synthray.app.audit.router import router as audit_router
from synthray.app.auth.router import router as auth_router
from synthray.app.batches.router import router as batches_router
from synthray.app.datasets.router import router as datasets_router
from synthray.app.db import engine_for, read_engine
from synthray.app.errors import ERROR_RESPONSES, ErrorBody, install_handlers, page_answer
from synthray.app.evaluations.router import router as evaluations_router
from synthray.app.exports.router import router as exports_router
from synthray.app.imagechecks.router import router as imagechecks_router
from synthray.app.jobs import broker
from synthray.app.jobs.router import router as jobs_router
from synthray.app.metrics import Metrics, token_accepted
from synthray.app.middleware import BodyLimit, Failures, RequestContext
from synthray.app.registry.router import router as registry_router
from synthray.app.web import router as web
from synthray.config import Settings, get_settings

log = logging.getLogger(__name__)

# Routes that stream a multipart body to disk under their own limit (max_upload_bytes).
UPLOAD_PATHS = ("/v1/datasets/upload", "/v1/image-checks")


def _errors_as_json(app: FastAPI) -> None:
    """Document every error answer as JSON: FastAPI gives a route's error responses the
    media type of its success (an HTML page, a PNG), but errors are always ErrorBody."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            for ops in doc["paths"].values():
                for op in ops.values():
                    for code, response in op.get("responses", {}).items():
                        content = response.get("content")
                        if code[0] in "45" and content and "application/json" not in content:
                            schema = next(iter(content.values())).get("schema", {})
                            response["content"] = {"application/json": {"schema": schema}}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """What belongs to the event loop that serves the application: on PostgreSQL, the
    asyncio engine of read-only requests (``db.read_engine``), disposed when it stops.
    Kept per loop: a test harness may run the lifespan again on another loop while the
    first is still up; requests on a loop without one use the threaded sessions."""
    engine = read_engine(app.state.settings.sqlalchemy_url)
    if engine is None:
        yield
        return
    loop = asyncio.get_running_loop()
    app.state.read_engines[loop] = engine
    try:
        yield
    finally:
        del app.state.read_engines[loop]
        await engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    docs = settings.api_docs if settings.api_docs is not None else settings.dev_mode
    app = FastAPI(
        title="SynthRay",
        version=__version__,
        description="Synthetic chest radiographs, gated for memorization before export.",
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.read_engines = {}  # event loop -> its db.read_engine, filled by _lifespan
    install_handlers(app)
    ratelimit.install(app, settings)
    # Added last, so outermost: the size cap holds before rate limiting and routing, and
    # Failures answers whatever escapes everything inside it.
    app.add_middleware(BodyLimit, limit=settings.max_json_bytes, exempt=UPLOAD_PATHS)
    app.add_middleware(Failures)
    metrics = Metrics(settings.sqlalchemy_url)
    app.state.metrics = metrics
    app.add_middleware(RequestContext, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _validation(req: Request, exc: RequestValidationError) -> Response:
        # Name the field and the reason; never echo the submitted value back.
        errors = [
            {"field": ".".join(str(p) for p in e["loc"][1:]) or e["loc"][0], "msg": e["msg"]}
            for e in exc.errors()
        ]
        text = "; ".join(f"{e['field']}: {e['msg']}" for e in errors)
        return page_answer(req, 422, text) or JSONResponse(
            status_code=422, content={"detail": errors}
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> Response:
        shown = page_answer(req, exc.status_code, str(exc.detail))
        if shown is not None:
            return shown
        return await http_exception_handler(req, exc)

    v1 = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
    for r in (
        auth_router,
        datasets_router,
        jobs_router,
        registry_router,
        batches_router,
        exports_router,
        imagechecks_router,
        evaluations_router,
        audit_router,
    ):
        v1.include_router(r)
    app.include_router(v1)
    web.install(app)
    _errors_as_json(app)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """The database and the broker answer, the data folder takes writes, and its blob
        folder is the store the database uses."""
        checks: dict[str, str] = {}
        try:
            with engine_for(settings.sqlalchemy_url).connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unavailable ({type(exc).__name__})"
        try:
            broker.ping(settings)
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"unavailable ({type(exc).__name__})"
        checks["storage"] = storage.writable(settings.data_dir, settings.min_free_bytes)
        if checks["database"] == "ok" and checks["storage"] == "ok":
            checks["blob_store"] = storecheck.status(settings.sqlalchemy_url, settings.blob_dir)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(status_code=200 if ok else 503, content=checks)

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=PlainTextResponse,
        responses={
            401: {"model": ErrorBody, "description": "A metrics token is set; this is not it."},
            404: {"model": ErrorBody, "description": "No metrics token is configured."},
        },
    )
    def prometheus(request: Request) -> Response:
        """Prometheus text format; needs the configured bearer token (or dev mode)."""
        if not settings.dev_mode and not token_accepted(
            settings.metrics_token, request.headers.get("authorization")
        ):
            status = 401 if settings.metrics_token else 404
            detail = "missing or wrong metrics token" if status == 401 else "Not Found"
            return JSONResponse(status_code=status, content={"detail": detail})
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app
