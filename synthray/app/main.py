"""The FastAPI application: versioned REST API under /v1, health probes at the root."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from synthray import __version__
from synthray.app import ratelimit
from synthray.app.audit.router import router as audit_router
from synthray.app.auth.router import router as auth_router
from synthray.app.batches.router import router as batches_router
from synthray.app.datasets.router import router as datasets_router
from synthray.app.db import engine_for
from synthray.app.errors import install_handlers
from synthray.app.evaluations.router import router as evaluations_router
from synthray.app.exports.router import router as exports_router
from synthray.app.imagechecks.router import router as imagechecks_router
from synthray.app.jobs import broker
from synthray.app.jobs.router import router as jobs_router
from synthray.app.registry.router import router as registry_router
from synthray.config import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI(
        title="SynthRay",
        version=__version__,
        description="Synthetic chest radiographs, gated for memorization before export.",
    )
    app.state.settings = settings
    install_handlers(app)
    ratelimit.install(app, settings)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the field and the reason; never echo the submitted value back.
        errors = [
            {"field": ".".join(str(p) for p in e["loc"][1:]) or e["loc"][0], "msg": e["msg"]}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    v1 = APIRouter(prefix="/v1")
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

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """The database and the broker answer."""
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
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(status_code=200 if ok else 503, content=checks)

    return app
