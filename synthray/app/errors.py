"""Domain errors that the API turns into clear 4xx answers (never a traceback)."""

from __future__ import annotations

import logging
import traceback

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from synthray.app.storage import BlobCorrupt

log = logging.getLogger(__name__)


class DomainError(Exception):
    status_code = 400

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class Unauthorized(DomainError):
    """No API key, or one that is unknown or revoked (401)."""

    status_code = 401


class NotFound(DomainError):
    status_code = 404


class Conflict(DomainError):
    status_code = 409


class Invalid(DomainError):
    """A request that is well-formed but names something impossible (422)."""

    status_code = 422


class Forbidden(DomainError):
    status_code = 403


class PayloadTooLarge(DomainError):
    status_code = 413


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_req: Request, exc: DomainError) -> JSONResponse:
        body: dict[str, object] = {"detail": exc.detail}
        if exc.field:
            body["field"] = exc.field
        return JSONResponse(status_code=exc.status_code, content=body)

    @app.exception_handler(BlobCorrupt)
    async def _corrupt(_req: Request, exc: BlobCorrupt) -> JSONResponse:
        log.error("integrity check failed: %s", exc)
        return JSONResponse(
            status_code=409,
            content={"detail": "a stored file failed its integrity check; refusing to serve it"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        # Log the type and the frames, not the message: messages of low-level errors can
        # carry file names, SQL parameters or header values.
        tb = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unhandled %s\n%s", type(exc).__name__, tb)
        return JSONResponse(status_code=500, content={"detail": "internal error"})
