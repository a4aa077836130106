"""Domain errors that the API turns into clear 4xx answers (never a traceback)."""

from __future__ import annotations

import errno
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc

from synthray.app.storage import BlobCorrupt

log = logging.getLogger(__name__)


class FieldError(BaseModel):
    field: str
    msg: str


class ErrorBody(BaseModel):
    """Every error answer: a sentence (or, for 422 on a malformed request, one entry per
    field), and the field it concerns where there is one. Never the submitted value."""

    detail: str | list[FieldError]
    field: str | None = None


def _described(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# What any /v1 operation may answer besides its success (documented on every route).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _described("A request the server cannot act on."),
    401: _described("No API key, or one that is unknown or revoked."),
    403: _described("The key's role may not do this."),
    404: _described("No such object (or one this key may not see)."),
    409: _described("The object is in a state that does not allow this."),
    413: _described("The body or upload is larger than the server accepts."),
    422: _described("A field is missing, malformed or out of range."),
    429: _described("Too many requests from this address; see Retry-After."),
    503: _described("The database is unavailable; see Retry-After."),
    507: _described("The server's storage is full."),
}


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


DB_RETRY_AFTER_S = 5
STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_unexpected(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """Status, a fixed sentence and headers for an exception no handler took (the API's
    answer, and a failed job's reason): the database or the disk, else an internal error."""
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError):
        return (
            503,
            "the database is unavailable; retry shortly",
            {"Retry-After": str(DB_RETRY_AFTER_S)},
        )
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return 503, "the database connection was lost; retry", {"Retry-After": "1"}
    if isinstance(exc, OSError) and exc.errno in STORAGE_FULL:
        return 507, "the server's storage is full; ask the operator to free space", {}
    return 500, "internal error", {}


def page_answer(req: Request, status_code: int, detail: str) -> Response | None:
    """The HTML page answering an error on a browser page (under /ui), else None."""
    render = getattr(req.app.state, "error_page", None)
    path = req.url.path
    if render is None or not (path == "/ui" or path.startswith("/ui/")):
        return None
    answer: Response = render(req, status_code, detail)
    return answer


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(req: Request, exc: DomainError) -> Response:
        shown = page_answer(req, exc.status_code, exc.detail)
        if shown is not None:
            return shown
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

    # Every other exception is answered by ``middleware.Failures`` (500, 503 or 507).
