"""Dependency aliases used by every router (short, uniform signatures)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from synthray.app.audit import service as audit
from synthray.app.auth import oidc
from synthray.app.auth import service as auth_service
from synthray.app.auth.schemas import Principal, Role
from synthray.app.db import session_scope
from synthray.app.errors import Forbidden, Unauthorized
from synthray.app.storage import BlobStore
from synthray.app.web import service as web
from synthray.config import Settings

F = TypeVar("F", bound=Callable[..., Any])


# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in
# its thread pool, and those hops were a large share of a small request's cost.
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def writes_on_read(endpoint: F) -> F:
    """Mark a GET endpoint that writes (it audits who viewed or downloaded something)."""
    endpoint.__synthray_writes__ = True  # type: ignore[attr-defined]
    return endpoint


def get_session(request: Request, settings: SettingsDep) -> Iterator[Session]:
    """One transaction per request, committed before the response is sent. A GET or HEAD
    reads only, unless its endpoint is marked with :func:`writes_on_read`."""
    route = request.scope.get("route")
    read_only = request.method in ("GET", "HEAD") and not getattr(
        getattr(route, "endpoint", None), "__synthray_writes__", False
    )
    with session_scope(settings.sqlalchemy_url, read_only=read_only) as session:
        yield session


# scope="function": the commit above runs when the endpoint returns, before the
# response goes out, so a client never sees a 2xx for a transaction that then fails.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_blobs(settings: SettingsDep) -> BlobStore:
    return BlobStore(settings.blob_dir)


BlobsDep = Annotated[BlobStore, Depends(get_blobs)]

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


def caller(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header: Annotated[str | None, Security(_header)],
) -> Principal | Unauthorized | Forbidden:
    """The caller's principal (an API key, or an identity-provider token when OIDC is
    configured), or the 401/403 to answer (for endpoints that audit failed attempts).

    A signed-in browser's session cookie stands in for the key on GET and HEAD only (the
    pages' images, the partner's download, live job progress): a request that changes
    something comes with a key, or through a page form that carries the CSRF token."""
    key = bearer.credentials if bearer else header
    if not key:
        if request.method in ("GET", "HEAD") and web.COOKIE in request.cookies:
            signed_in = web.browser(session, settings, request.cookies[web.COOKIE])
            if signed_in is not None:
                return signed_in.principal
        return Unauthorized("missing API key (Authorization: Bearer <key> or X-API-Key)")
    if settings.oidc_issuer and bearer and oidc.looks_like_jwt(key):
        try:
            return oidc.authenticate(session, settings, key)
        except oidc.TokenRefused as refused:
            kind = Forbidden if refused.forbidden else Unauthorized
            return kind(f"identity token refused: {refused.reason}")
    principal = auth_service.authenticate(session, settings.secret_key, key)
    if principal is None:
        return Unauthorized("invalid or revoked API key")
    return principal


CallerDep = Annotated[Principal | Unauthorized | Forbidden, Depends(caller)]


def refuse_route(request: Request, session: Session, who: Principal | None, reason: str) -> None:
    """Audit a refused request (committed at once; the request itself ends in an error):
    its method and path (printable characters, at most 64), never its body or query."""
    path = "".join(c for c in request.url.path if c.isprintable())
    audit.record_refusal(session, who, "request", "route", f"{request.method} {path}"[:64], reason)


async def current_principal(request: Request, session: SessionDep, who: CallerDep) -> Principal:
    if isinstance(who, Unauthorized | Forbidden):
        reason = who.detail[:200] if who.detail.startswith("identity") else "no valid API key"
        await run_in_threadpool(refuse_route, request, session, None, reason)
        raise who
    return who


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    allowed = set(roles) | {Role.admin}

    async def check(
        request: Request, session: SessionDep, principal: CurrentPrincipal
    ) -> Principal:
        if principal.role not in allowed:
            names = ", ".join(sorted(r.value for r in allowed))
            reason = f"role {principal.role} lacks the right"
            await run_in_threadpool(refuse_route, request, session, principal, reason)
            raise Forbidden(f"this action needs role: {names}")
        return principal

    return check


AdminDep = Annotated[Principal, Depends(require(Role.admin))]
OperatorDep = Annotated[Principal, Depends(require(Role.operator))]
ReviewerDep = Annotated[Principal, Depends(require(Role.reviewer))]
StaffDep = Annotated[Principal, Depends(require(Role.operator, Role.reviewer))]


def multipart_body(field: str, description: str) -> dict[str, object]:
    """OpenAPI description of an upload: a JSON text field and one file part (the
    endpoints read the stream themselves, so FastAPI cannot infer it)."""
    return {
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [field, "file"],
                        "properties": {
                            field: {
                                "type": "string",
                                "maxLength": 65536,
                                "description": description,
                            },
                            "file": {"type": "string", "format": "binary"},
                        },
                    }
                }
            },
            "required": True,
        }
    }
