"""Browser sessions: an API key (or a sign-in at the identity provider, ``web.provider``)
exchanged once for a random cookie token.

The cookie holds 256 random bits; the database holds only their HMAC under the site
secret (as for API keys), the key it stands for, a CSRF token and an expiry. Every request
re-reads the key, so revoking a key ends its browser sessions at once. The CSRF token is
the session's own (synchronizer pattern); the sign-in form, which has no session yet, uses
a double-submit token in a short-lived cookie of its own.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from synthray.app.audit import service as audit
from synthray.app.auth import service as auth
from synthray.app.auth.schemas import Principal
from synthray.app.db import utcnow
from synthray.app.web import repository
from synthray.app.web.tables import WebSession
from synthray.config import Settings

COOKIE = "synthray_session"
SIGNIN_COOKIE = "synthray_signin"
SECURE_PREFIX = "__Host-"


def secure_cookies(scheme: str, settings: Settings) -> bool:
    """Whether this request's cookies are Secure: over HTTPS always, and behind a TLS proxy
    that does not forward its scheme when the setting says so."""
    return bool(settings.web_cookie_secure) or scheme == "https"


def cookie_name(base: str, secure: bool) -> str:
    """The name a cookie goes by: ``__Host-`` first when it is Secure. A browser keeps such
    a cookie only if it is Secure, for this host alone (no Domain) and for Path=/, so
    neither a sibling subdomain nor a plain-HTTP page of the same host can set or overwrite
    it (cookie tossing: a planted session or sign-in flow). The plain name is read only
    where the prefixed one cannot exist (plain HTTP with the setting off)."""
    return SECURE_PREFIX + base if secure else base


@dataclass(frozen=True)
class Browser:
    """A signed-in browser: who it acts as, and the token its forms must carry."""

    principal: Principal
    csrf: str
    session_id: int


def _digest(settings: Settings, token: str) -> str:
    return auth.hash_key(settings.secret_key, "web-session:" + token)


def sign_in(session: Session, settings: Settings, key: str) -> tuple[str, Browser] | None:
    """A new session for a valid API key: the cookie token and the browser; None (and an
    audited refusal) for a key that is unknown or revoked."""
    principal = auth.authenticate(session, settings.secret_key, key.strip())
    if principal is None:
        audit.record_refusal(session, None, "sign_in", "web_session", None, "no valid API key")
        return None
    return open_session(session, settings, principal)


def open_session(session: Session, settings: Settings, principal: Principal) -> tuple[str, Browser]:
    """A new browser session for a principal already authenticated (by an API key or the
    identity provider): the cookie token and the browser."""
    token = secrets.token_urlsafe(32)
    row = repository.add(
        session,
        WebSession(
            token_hash=_digest(settings, token),
            key_id=principal.key_id,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=utcnow() + timedelta(hours=settings.web_session_hours),
        ),
    )
    audit.record(session, principal, "sign_in", "web_session", row.id, "ok")
    return token, Browser(principal, row.csrf_token, row.id)


def browser(session: Session, settings: Settings, token: str | None) -> Browser | None:
    """The browser a cookie token stands for, while the session and its key are valid."""
    if not token or len(token) > 100:
        return None
    row = repository.by_hash(session, _digest(settings, token))
    if row is None or row.ended_at is not None or row.expires_at <= utcnow():
        return None
    principal = auth.principal_for(session, row.key_id)
    if principal is None:
        return None
    return Browser(principal, row.csrf_token, row.id)


def sign_out(session: Session, settings: Settings, token: str | None) -> None:
    row = repository.by_hash(session, _digest(settings, token)) if token else None
    if row is not None and row.ended_at is None:
        row.ended_at = utcnow()
        principal = auth.principal_for(session, row.key_id)
        audit.record(session, principal, "sign_out", "web_session", row.id, "ok")
        session.flush()


def new_form_token() -> str:
    """A random token for the sign-in form and its cookie (double submit)."""
    return secrets.token_urlsafe(24)


def same_token(expected: str | None, submitted: str | None) -> bool:
    """Whether a form carried the expected CSRF token (compared in constant time)."""
    if not expected or not submitted:
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())
