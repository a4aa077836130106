"""Process logging: one JSON object per line (or plain text), with the request and job ids.

Every API request gets an id (the caller's ``X-Request-ID`` when it is a short token of
safe characters, else a fresh one), answered in the ``X-Request-ID`` header and stored on
any job the request creates; the worker that runs the job logs under the same id and the
job's own id, so one search in the hospital's log collector follows a request from the
API into the worker. Both ids travel in context variables, so library code logs them
without being passed them.

What is logged is ours to choose, and the rule is: types, ids, counts and route templates,
never an exception's message, a file name, a header value or a path a client typed (any of
them may carry patient data). The JSON formatter is the standard library's logging with a
dozen lines on top; a structured-logging library would add a dependency for no more than
this.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "synthray_request_id", default=None
)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("synthray_job_id", default=None)

_SAFE_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")


def accept_request_id(presented: str | None) -> str:
    """The caller's id if it is a short token of safe characters, else a fresh one (a
    header value is never logged as it came: it could hold anything)."""
    if presented and _SAFE_ID.fullmatch(presented):
        return presented
    return uuid.uuid4().hex


@contextlib.contextmanager
def bound(*, request: str | None = None, job: str | None = None) -> Iterator[None]:
    """Log under these ids inside the block (a job run, a request)."""
    tokens = []
    if request is not None:
        tokens.append((request_id, request_id.set(request)))
    if job is not None:
        tokens.append((job_id, job_id.set(job)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.job_id = job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "request_id", "job_id", ...}`` on one line;
    ``exc_info`` becomes the exception's type and frames, never its message."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        for key, value in getattr(record, "fields", {}).items():
            entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc_frames"] = "".join(traceback.format_tb(record.exc_info[2]))
        return json.dumps(entry, default=str)


def _frames_only(ei: ExcInfo) -> str:
    """A traceback without its last line ("Type: message"): the type and the frames."""
    exc_type, _exc, tb = ei
    name = exc_type.__name__ if exc_type else "?"
    return f"{name} raised at\n" + "".join(traceback.format_tb(tb)).rstrip()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(job_id)s] %(message)s"
        )

    def formatException(self, ei: ExcInfo) -> str:  # noqa: N802
        return _frames_only(ei)


def configure(fmt: Literal["json", "text"] = "json", level: str = "INFO") -> None:
    """Send every logger (ours, uvicorn's, Celery's) to stderr in ``fmt``, with the ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextIds())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log prints the raw path and query; ours (app/middleware.py) logs
    # the route template, the status and the time under the request id instead.
    for name in ("uvicorn", "uvicorn.error", "celery", "celery.task"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
