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

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

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


def presented_key(headers: Headers) -> str | None:
    """The API key the request carries (Bearer or X-API-Key), unchecked."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


class RateLimit:
    """Pure ASGI middleware (no task or stream per request, as ``@app.middleware`` adds)
    that counts each request per address and per presented key before anything else runs."""

    def __init__(self, app: ASGIApp, per_address: RateLimiter, per_key: RateLimiter) -> None:
        self.app = app
        self.per_address = per_address
        self.per_key = per_key

    def _check(self, scope: Scope) -> tuple[RateLimitItem, int] | None:
        client = scope.get("client")
        address = client[0] if client else "unknown"
        broken = self.per_address.check(address) if self.per_address.items else None
        key = presented_key(Headers(scope=scope))
        if broken is None and key and self.per_key.items:
            digest = hashlib.sha256(key.encode()).hexdigest()[:32]
            broken = self.per_key.check(f"key:{digest}")
        return broken

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        try:
            broken = self._check(scope)
        except Exception as exc:  # the counter store (Redis) is down: serve, and say so
            log.error("rate limit store unavailable (%s); request not counted", type(exc).__name__)
            broken = None
        if broken is None:
            await self.app(scope, receive, send)
            return
        item, retry_after = broken
        refusal = JSONResponse(
            status_code=429,
            content={"detail": f"rate limit exceeded ({item}); retry after {retry_after} s"},
            headers={"Retry-After": str(retry_after)},
        )
        await refusal(scope, receive, send)


def install(app: FastAPI, settings: Settings) -> None:
    """Limit every route but the probes, per address and per presented key; an empty
    spec turns that limit off."""
    limiter = RateLimiter(settings.rate_limit, settings.rate_limit_storage)
    per_key = RateLimiter(settings.rate_limit_per_key, settings.rate_limit_storage)
    if limiter.items or per_key.items:
        app.add_middleware(RateLimit, per_address=limiter, per_key=per_key)
