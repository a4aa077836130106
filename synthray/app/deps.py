"""Dependency aliases used by every router (short, uniform signatures)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from synthray.app.auth import service as auth_service
from synthray.app.auth.schemas import Principal, Role
from synthray.app.db import session_scope
from synthray.app.errors import Forbidden, Unauthorized
from synthray.app.storage import BlobStore
from synthray.config import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One transaction per request, committed before the response is sent."""
    with session_scope(settings.sqlalchemy_url) as session:
        yield session


# scope="function": the commit above runs when the endpoint returns, before the
# response goes out, so a client never sees a 2xx for a transaction that then fails.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_blobs(settings: SettingsDep) -> BlobStore:
    return BlobStore(settings.blob_dir)


BlobsDep = Annotated[BlobStore, Depends(get_blobs)]

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


def caller(
    session: SessionDep,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header: Annotated[str | None, Security(_header)],
) -> Principal | Unauthorized:
    """The key's principal, or the 401 to answer (for endpoints that audit failed attempts)."""
    key = bearer.credentials if bearer else header
    if not key:
        return Unauthorized("missing API key (Authorization: Bearer <key> or X-API-Key)")
    principal = auth_service.authenticate(session, settings.secret_key, key)
    if principal is None:
        return Unauthorized("invalid or revoked API key")
    return principal


CallerDep = Annotated[Principal | Unauthorized, Depends(caller)]


def current_principal(who: CallerDep) -> Principal:
    if isinstance(who, Unauthorized):
        raise who
    return who


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require(*roles: Role) -> Callable[[Principal], Principal]:
    allowed = set(roles) | {Role.admin}

    def check(principal: CurrentPrincipal) -> Principal:
        if principal.role not in allowed:
            names = ", ".join(sorted(r.value for r in allowed))
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
                            field: {"type": "string", "description": description},
                            "file": {"type": "string", "format": "binary"},
                        },
                    }
                }
            },
            "required": True,
        }
    }
