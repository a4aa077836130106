"""Staff sign-in through the hospital's identity provider: OIDC access tokens (JWTs).

Besides API keys, the API accepts a bearer token issued by the hospital's OpenID Connect
provider when ``SYNTHRAY_OIDC_ISSUER`` is set. PyJWT does the cryptography and the claim
checks (signature against the provider's JWKS, ``exp``/``nbf``/``iat`` with a small
leeway, ``iss``, ``aud``); what this module adds is policy:

- only asymmetric algorithms are accepted (RS*, PS*, ES*, EdDSA), so neither ``alg: none``
  nor an HMAC token "signed" with the public key can pass;
- the key is chosen by the token's ``kid`` from the configured JWKS (a URL, fetched and
  cached by PyJWT's client, or a file the operator manages); an unknown kid is refused;
- the role comes from the token's groups claim through ``SYNTHRAY_OIDC_ROLES``
  (``group=role`` pairs); staff roles only, since partners are outside the hospital and
  hold API keys; a token with no mapped group is authenticated but has no role (403);
- each subject is recorded once as an identity row beside the API keys (``prefix`` oidc),
  so jobs, approvals and the audit trail name a person, and an admin can revoke that person
  locally even while the provider still issues tokens. The row's role follows the groups
  of the latest token.

Why PyJWT: maintained, small, and its JWKS client caches keys and refetches on an unknown
kid (a key rotation at the provider) without our code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jwt
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from synthray.app.auth import repository
from synthray.app.auth.schemas import Principal, Role
from synthray.app.auth.tables import ApiKey
from synthray.app.db import session_scope
from synthray.config import Settings

log = logging.getLogger(__name__)

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
LEEWAY_S = 30
# A role held through several groups: the first of these wins.
PRECEDENCE = (Role.admin, Role.reviewer, Role.operator)
STAFF_ROLES = frozenset({Role.admin, Role.operator, Role.reviewer})
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@\-]")


class TokenRefused(Exception):
    """The token is not one we accept; ``reason`` is a fixed sentence for the audit log."""

    def __init__(self, reason: str, *, forbidden: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.forbidden = forbidden  # authenticated, but no role (403 rather than 401)


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and not token.startswith("sr_")


def role_map(spec: str) -> dict[str, Role]:
    """``"radiology-it=operator, privacy=reviewer"`` -> {group: role}; staff roles only."""
    out: dict[str, Role] = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        group, _, role = pair.rpartition("=")
        if not group or role not in {r.value for r in STAFF_ROLES}:
            raise ValueError(
                f"SYNTHRAY_OIDC_ROLES: {pair!r} is not group=role with role admin, "
                "operator or reviewer"
            )
        out[group.strip()] = Role(role)
    return out


class _FileKeys:
    """A JWKS the operator keeps in a file (re-read when the file changes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: float | None = None
        self._keys: dict[str, jwt.PyJWK] = {}

    def key_for(self, token: str) -> jwt.PyJWK:
        stamp = self.path.stat().st_mtime
        if stamp != self._stamp:
            jwks = jwt.PyJWKSet.from_dict(json.loads(self.path.read_text()))
            self._keys = {k.key_id: k for k in jwks.keys if k.key_id}
            self._stamp = stamp
        kid = jwt.get_unverified_header(token).get("kid")
        if kid not in self._keys:
            raise TokenRefused("unknown signing key")
        return self._keys[kid]


class _UrlKeys:
    def __init__(self, url: str) -> None:
        self.client = jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=5)

    def key_for(self, token: str) -> jwt.PyJWK:
        try:
            return self.client.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise TokenRefused("the identity provider's keys could not be fetched") from exc
        except jwt.PyJWKClientError as exc:
            raise TokenRefused("unknown signing key") from exc


@lru_cache(maxsize=4)
def _keys(source: str) -> _FileKeys | _UrlKeys:
    if source.startswith(("https://", "http://")):
        return _UrlKeys(source)
    return _FileKeys(Path(source))


def verify(settings: Settings, token: str, audience: str | None = None) -> dict[str, Any]:
    """The token's claims if it is valid for this service (its ``aud`` names ``audience``,
    by default the configured API audience); else :class:`TokenRefused`."""
    assert settings.oidc_issuer and settings.oidc_jwks
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:
        raise TokenRefused("malformed token") from exc
    if header.get("alg") not in ALGORITHMS:
        raise TokenRefused("token algorithm not accepted")
    key = _keys(settings.oidc_jwks).key_for(token)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=[header["alg"]],
            audience=audience or settings.oidc_audience,
            issuer=settings.oidc_issuer,
            leeway=LEEWAY_S,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenRefused("token expired") from exc
    except jwt.InvalidAudienceError as exc:
        raise TokenRefused("token not issued for this service") from exc
    except jwt.InvalidIssuerError as exc:
        raise TokenRefused("token from another issuer") from exc
    except jwt.InvalidTokenError as exc:  # bad signature, missing claim, not yet valid ...
        raise TokenRefused(f"invalid token ({type(exc).__name__})") from exc
    return claims


def role_of(settings: Settings, claims: dict[str, Any]) -> Role:
    groups = claims.get(settings.oidc_groups_claim, [])
    if isinstance(groups, str):
        groups = [groups]
    mapping = role_map(settings.oidc_roles)
    held = {mapping[g] for g in groups if isinstance(g, str) and g in mapping}
    for role in PRECEDENCE:
        if role in held:
            return role
    raise TokenRefused("no group of this identity is mapped to a role", forbidden=True)


def _identity_hash(secret_key: str, issuer: str, subject: str) -> str:
    # Cannot equal an API key's hash: those are HMACs of "sr_..." strings.
    return hmac.new(
        secret_key.encode(), f"oidc\x00{issuer}\x00{subject}".encode(), hashlib.sha256
    ).hexdigest()


# A person's name in the key list; API key names cannot hold a colon.
IDENTITY_PREFIX = "oidc:"


def _display_name(claims: dict[str, Any]) -> str:
    raw = str(claims.get("preferred_username") or claims.get("sub"))
    return (IDENTITY_PREFIX + _UNSAFE.sub("_", raw))[:100]


def _upsert(s: Session, digest: str, role: Role, name: str) -> ApiKey:
    stored = repository.by_hash(s, digest)
    if stored is None:
        stored = repository.add(s, ApiKey(name=name, role=role, prefix="oidc", key_hash=digest))
        log.info("first sign-in of an identity-provider user (identity %d)", stored.id)
    stored.role = role
    s.flush()
    return stored


def _record_identity(
    settings: Settings, session: Session | None, digest: str, role: Role, name: str
) -> tuple[int, str, datetime | None]:
    """Create or update the identity row: in ``session`` (under a savepoint) when the
    request's transaction may write, else in a short transaction of its own (a bearer
    token's GET reads only). A concurrent first sign-in of the same person is read back."""
    for attempt in (1, 2):
        try:
            if session is not None:
                with session.begin_nested():
                    stored = _upsert(session, digest, role, name)
            else:
                with session_scope(settings.sqlalchemy_url) as s:
                    stored = _upsert(s, digest, role, name)
            return stored.id, stored.name, stored.revoked_at
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def authenticate(session: Session, settings: Settings, token: str) -> Principal:
    """The principal for a valid token: its identity row (created on first sign-in, role
    refreshed from the token), unless an admin revoked it. Raises :class:`TokenRefused`."""
    return principal_from_claims(session, settings, verify(settings, token))


def principal_from_claims(
    session: Session, settings: Settings, claims: dict[str, Any], *, writable: bool = False
) -> Principal:
    """The principal for verified claims (an access token's, or a browser sign-in's ID
    token): the role from the groups, the identity row shared by both ways in. With
    ``writable``, the row is written in ``session`` (whose transaction may write)."""
    role = role_of(settings, claims)
    digest = _identity_hash(settings.secret_key, settings.oidc_issuer or "", str(claims["sub"]))
    row = repository.by_hash(session, digest)
    if row is None or row.role != role:
        key_id, name, revoked = _record_identity(
            settings, session if writable else None, digest, role, _display_name(claims)
        )
    else:
        key_id, name, revoked = row.id, row.name, row.revoked_at
    if revoked is not None:
        raise TokenRefused("this identity was revoked here")
    return Principal(key_id=key_id, name=name, role=role)
