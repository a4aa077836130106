"""Staff sign-in in the browser through the hospital's identity provider: the OpenID
Connect authorization code flow with PKCE (RFC 7636).

The pages keep a browser session (``web.service``); this module decides who gets one.

1. ``/ui/signin/provider`` sends the browser to the provider's authorization endpoint with
   a ``state``, a ``nonce`` and a PKCE challenge, and sets a short-lived cookie holding a
   random seed (with its time). All three values are HMACs of that seed under the site
   secret, so nothing is stored on the server, and a seed is worthless without the secret
   or after ``FLOW_SECONDS``.
2. The provider sends the browser back to ``/ui/signin/provider/callback`` with a code and
   the state. The state must be the one derived from this browser's cookie (no login
   CSRF); the code is exchanged at the token endpoint, directly from the server, with the
   PKCE verifier (and the client secret of a confidential client); the ID token that comes
   back is verified as bearer tokens are (signature against the JWKS, asymmetric
   algorithms only, issuer, expiry), with the client id as audience and the nonce
   compared (no replay of another sign-in's token).
3. The role comes from the token's groups, as for bearer tokens, and the identity row is
   the same one, so an admin's revocation ends both; the browser session is the same kind
   a key opens.

Signing out ends the browser session here and, for a person who signed in at the provider
and when its discovery document names an ``end_session_endpoint``, sends the browser there
too (OpenID Connect RP-Initiated Logout 1.0, with ``client_id`` and
``post_logout_redirect_uri``): otherwise the provider's own session would sign the next
person at that browser straight back in. No ID token is kept for ``id_token_hint``, so a
provider may ask the person to confirm.

The endpoints come from the provider's discovery document
(``<issuer>/.well-known/openid-configuration``, whose ``issuer`` must be the configured
one), fetched once and kept for an hour.

Why no OAuth client library: Authlib's Starlette client keeps the flow's state in
Starlette's session middleware (a signed cookie on every request of the API); the exchange
is one POST, and the token checks are PyJWT's, already used for bearer tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
from sqlalchemy.orm import Session

from synthray.app.auth import oidc
from synthray.app.auth.oidc import TokenRefused
from synthray.app.auth.schemas import Principal
from synthray.config import Settings

COOKIE = "synthray_provider"
FLOW_SECONDS = 600
DISCOVERY_SECONDS = 3600
HTTP_TIMEOUT_S = 10.0


class ProviderUnavailable(Exception):
    """The provider's discovery document or token endpoint could not be used."""


@dataclass(frozen=True)
class Endpoints:
    authorization: str
    token: str
    end_session: str | None = None


_discovered: dict[str, tuple[float, Endpoints]] = {}
_discovery_lock = threading.Lock()


def enabled(settings: Settings) -> bool:
    return bool(settings.oidc_issuer and settings.oidc_client_id)


def endpoints(settings: Settings) -> Endpoints:
    """The provider's authorization and token endpoints, from its discovery document."""
    issuer = settings.oidc_issuer or ""
    with _discovery_lock:
        cached = _discovered.get(issuer)
        if cached is not None and time.monotonic() - cached[0] < DISCOVERY_SECONDS:
            return cached[1]
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        r = httpx.get(url, timeout=HTTP_TIMEOUT_S)
        r.raise_for_status()
        doc = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ProviderUnavailable(f"discovery failed ({type(exc).__name__})") from exc
    if not isinstance(doc, dict) or doc.get("issuer") != issuer:
        raise ProviderUnavailable("the discovery document names another issuer")
    auth_url, token_url = doc.get("authorization_endpoint"), doc.get("token_endpoint")
    if not (isinstance(auth_url, str) and isinstance(token_url, str)):
        raise ProviderUnavailable("the discovery document lacks the endpoints")
    end = doc.get("end_session_endpoint")
    found = Endpoints(auth_url, token_url, end if isinstance(end, str) else None)
    with _discovery_lock:
        _discovered[issuer] = (time.monotonic(), found)
    return found


def new_seed() -> str:
    """The flow cookie's value: when the flow began, and 192 random bits."""
    return f"{int(time.time())}.{secrets.token_urlsafe(24)}"


def _derive(settings: Settings, seed: str, purpose: str) -> str:
    mac = hmac.new(settings.secret_key.encode(), f"oidc-{purpose}\x00{seed}".encode(), "sha256")
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()  # 43 characters


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorization_url(settings: Settings, seed: str, redirect_uri: str) -> str:
    """Where to send the browser to sign in at the provider."""
    params = {
        "response_type": "code",
        "client_id": settings.oidc_client_id or "",
        "redirect_uri": redirect_uri,
        "scope": settings.oidc_scopes,
        "state": _derive(settings, seed, "state"),
        "nonce": _derive(settings, seed, "nonce"),
        "code_challenge": _challenge(_derive(settings, seed, "pkce")),
        "code_challenge_method": "S256",
    }
    base = endpoints(settings).authorization
    return base + ("&" if "?" in base else "?") + urlencode(params)


def logout_url(settings: Settings, post_logout_redirect_uri: str) -> str | None:
    """Where to send a browser to end the person's session at the provider, or None when
    the provider offers no such endpoint or cannot be reached (the session here has
    ended either way)."""
    try:
        base = endpoints(settings).end_session
    except ProviderUnavailable:
        return None
    if not base:
        return None
    params = {
        "client_id": settings.oidc_client_id or "",
        "post_logout_redirect_uri": post_logout_redirect_uri,
    }
    return base + ("&" if "?" in base else "?") + urlencode(params)


def _fresh(seed: str | None) -> str | None:
    """The seed if it is well formed and its flow began less than FLOW_SECONDS ago."""
    if not seed or len(seed) > 80:
        return None
    began, _, rest = seed.partition(".")
    if not began.isdigit() or not rest:
        return None
    return seed if 0 <= time.time() - int(began) <= FLOW_SECONDS else None


def complete(
    session: Session,
    settings: Settings,
    seed: str | None,
    state: str,
    code: str,
    redirect_uri: str,
) -> Principal:
    """The principal of a provider sign-in that came back with ``code`` (``session`` may
    write: the identity row is recorded in it); raises
    :class:`TokenRefused` (a fixed sentence, audited by the caller) or
    :class:`ProviderUnavailable`."""
    live = _fresh(seed)
    if live is None:
        raise TokenRefused("the sign-in took too long or began in another browser")
    if not hmac.compare_digest(_derive(settings, live, "state").encode(), state.encode()):
        raise TokenRefused("the sign-in answer does not belong to this browser's sign-in")
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": _derive(settings, live, "pkce"),
        "client_id": settings.oidc_client_id or "",
    }
    secret = settings.oidc_client_secret
    basic = (settings.oidc_client_id or "", secret) if secret else None
    try:
        r = httpx.post(endpoints(settings).token, data=form, auth=basic, timeout=HTTP_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise ProviderUnavailable(f"token endpoint unreachable ({type(exc).__name__})") from exc
    if r.status_code != 200:
        raise TokenRefused("the identity provider did not accept the sign-in code")
    try:
        answer: Any = r.json()
    except ValueError:
        answer = None
    id_token = answer.get("id_token") if isinstance(answer, dict) else None
    if not isinstance(id_token, str) or len(id_token) > 16384:
        raise TokenRefused("the identity provider's answer has no ID token")
    claims = oidc.verify(settings, id_token, audience=settings.oidc_client_id)
    nonce = claims.get("nonce")
    expected = _derive(settings, live, "nonce")
    if not isinstance(nonce, str) or not hmac.compare_digest(nonce.encode(), expected.encode()):
        raise TokenRefused("the ID token belongs to another sign-in")
    return oidc.principal_from_claims(session, settings, claims, writable=True)
