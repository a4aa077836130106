"""Per-client request limits, counted by the ``limits`` library.

``limits`` (the library under flask-limiter and slowapi) provides the limit notation
("1200/minute"), the moving-window counter and its memory and Redis back ends; this module
only decides what is counted. slowapi's own middleware was tried first, but it finds the
route through attributes that FastAPI's included routers no longer expose, so it silently
limited nothing; a few lines of middleware over ``limits`` do not depend on routing details.

Requests are counted per client address, before authentication: counting per API key alone
would give every guessed key a fresh allowance, and looking keys up before counting would
let a flood reach the database. A request that carries a key is also counted against that
key (by a hash of it, never the key itself, and without looking it up), so one key used
from many addresses is limited too. Behind a reverse proxy, set
``SYNTHRAY_FORWARDED_ALLOW_IPS`` so that the address is the client's, not the proxy's. The
health probes are exempt. A refused request gets 429, the limit it broke and Retry-After. When the
counter store cannot be reached the request is served and the failure logged: the limit
protects the service, and taking the whole API down with Redis would defeat that.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from synthray.config import Settings

log = logging.getLogger(__name__)

EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})


class RateLimiter:
    """All of ``spec``'s limits ("1200/minute;50/second") for each client key."""

    def __init__(self, spec: str, storage_uri: str) -> None:
        self.items: list[RateLimitItem] = parse_many(spec) if spec.strip() else []
        self.strategy = MovingWindowRateLimiter(storage_from_string(storage_uri))

    def check(self, key: str) -> tuple[RateLimitItem, int] | None:
        """Count one request; None if allowed, else the broken limit and seconds to wait."""
        for item in self.items:
            if not self.strategy.hit(item, "synthray", key):
                reset = self.strategy.get_window_stats(item, "synthray", key).reset_time
                return item, max(1, math.ceil(reset - time.time()))
        return None


def presented_key(request: Request) -> str | None:
    """The API key the request carries (Bearer or X-API-Key), unchecked."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


def install(app: FastAPI, settings: Settings) -> None:
    """Limit every route but the probes, per address and per presented key; an empty
    spec turns that limit off."""
    limiter = RateLimiter(settings.rate_limit, settings.rate_limit_storage)
    per_key = RateLimiter(settings.rate_limit_per_key, settings.rate_limit_storage)
    if not limiter.items and not per_key.items:
        return

    def check(request: Request) -> tuple[RateLimitItem, int] | None:
        client = request.client.host if request.client else "unknown"
        broken = limiter.check(client) if limiter.items else None
        key = presented_key(request)
        if broken is None and key and per_key.items:
            digest = hashlib.sha256(key.encode()).hexdigest()[:32]
            broken = per_key.check(f"key:{digest}")
        return broken

    @app.middleware("http")
    async def _limit(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path in EXEMPT:
            return await call_next(request)
        try:
            broken = check(request)
        except Exception as exc:  # the counter store (Redis) is down: serve, and say so
            log.error("rate limit store unavailable (%s); request not counted", type(exc).__name__)
            broken = None
        if broken is None:
            return await call_next(request)
        item, retry_after = broken
        return JSONResponse(
            status_code=429,
            content={"detail": f"rate limit exceeded ({item}); retry after {retry_after} s"},
            headers={"Retry-After": str(retry_after)},
        )
