"""Pure ASGI middlewares that hold for every request, whatever the route does.

``RequestContext`` (outermost) gives each request an id, logs it and counts it.

``BodyLimit`` bounds what a client can make the server read: a declared Content-Length
over the limit is refused with 413 before one byte is read, and a body without one
(chunked) is counted as it arrives and cut off at the limit. Uploads have their own,
larger limit and stream to disk (``datasets.uploads``); every other body is JSON that
FastAPI buffers and parses before any dependency runs, so this cap is what keeps an
unauthenticated client from costing more than ``max_json_bytes`` of memory. (FastAPI
0.165's ``max_body_size`` counts the same way but only once the body is read, answers a
fixed "Content Too Large", and takes per-route limits at import time, while ours come
from the settings and exempt the uploads; the project also still allows FastAPI 0.115.)

``Failures`` answers every exception no handler took. Starlette's own last-resort
middleware re-raises after answering, so uvicorn prints the traceback with the
exception's message (file names, SQL parameters) and drops the keep-alive connection.
Here the log gets the type and the frames only, and the client a fixed sentence: 503
with Retry-After when the database cannot be reached, 507 when the disk is full, else
500.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from synthray import logs
from synthray.app.errors import describe_unexpected
from synthray.app.metrics import Metrics

log = logging.getLogger(__name__)
access = logging.getLogger("synthray.access")


async def _send_json(
    send: Send, status: int, body: dict[str, object], headers: Iterable[tuple[str, str]] = ()
) -> None:
    payload = json.dumps(body).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *((k.encode(), v.encode()) for k, v in headers),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """413 for a request body over ``limit`` bytes, except on ``exempt`` paths."""

    def __init__(self, app: ASGIApp, limit: int, exempt: Iterable[str] = ()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        limit = self.limit
        too_large: dict[str, object] = {"detail": f"the request body is larger than {limit} bytes"}
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await _send_json(send, 413, too_large, [("connection", "close")])
                return
        seen = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    await _send_json(send, 413, too_large, [("connection", "close")])
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # the 413 is the answer; drop what the app says after it
                await send(message)

        await self.app(scope, counting_receive, guarded_send)


class Failures:
    """The last word on an unhandled exception: logged by type and frames, answered once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            status, detail, headers = describe_unexpected(exc)
            tb = "".join(traceback.format_tb(exc.__traceback__))
            log.error(
                "%s %s: unhandled %s -> %d\n%s",
                scope.get("method"),
                scope["path"],
                type(exc).__name__,
                status,
                tb,
            )
            if started:  # too late for a status: the client sees a cut-off response
                return
            await _send_json(send, status, {"detail": detail}, headers.items())


def route_template(scope: Scope) -> str:
    """``/v1/jobs/{job_id}`` for ``/v1/jobs/4f0b...``: each path parameter's segment put
    back as its name (FastAPI's nested routers give a route only its own part of the path),
    or ``unmatched`` when no route took the request."""
    if scope.get("route") is None:
        return "unmatched"
    segments = str(scope["path"]).split("/")
    taken: set[int] = set()
    for name, value in scope.get("path_params", {}).items():
        for i, seg in enumerate(segments):
            if i not in taken and seg == str(value):
                segments[i] = "{" + name + "}"
                taken.add(i)
                break
    return "/".join(segments)


class RequestContext:
    """A request id for every request (``X-Request-ID`` in and out), bound to the logs for
    the request's duration; then one access-log line and the request metrics, both by
    route template (``/v1/jobs/{job_id}``), never the path a client typed."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        rid = logs.accept_request_id(presented.decode("latin-1") or None)
        status = 500  # what Failures answers if nothing else does
        start = time.perf_counter()

        async def tagged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        with logs.bound(request=rid):
            try:
                await self.app(scope, receive, tagged_send)
            finally:
                seconds = time.perf_counter() - start
                route = route_template(scope)
                method = scope.get("method", "")
                if self.metrics is not None:
                    self.metrics.observe(route, method, status, seconds)
                access.info(
                    "%s %s %d %.1f ms",
                    method,
                    route,
                    status,
                    seconds * 1000,
                    extra={"fields": {"route": route, "status": status}},
                )
