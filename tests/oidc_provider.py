"""A small OpenID Connect provider for tests, over real HTTP: discovery, JWKS, an
authorization endpoint whose page signs in whoever the test names with one link (no
password), and a token
endpoint that checks what a real provider checks (the code used once, the redirect URI,
the client's secret, the PKCE verifier against its S256 challenge) before it issues an ID
token signed with a real RSA key. A test can make it misbehave: a wrong nonce, another
audience, a key it never published, a refusal."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

CLIENT_ID = "synthray-pages"
CLIENT_SECRET = "pages-secret-for-tests"
API_AUDIENCE = "synthray-api"


@dataclass
class Person:
    sub: str = "u-4242"
    username: str = "dr.lovelace"
    groups: list[str] = field(default_factory=lambda: ["radiology-ops"])


@dataclass
class Provider:
    """The provider's state; ``issuer`` is its base URL once served."""

    host: str = "127.0.0.1"
    issuer: str = ""
    person: Person = field(default_factory=Person)
    # Misbehaviour, for the refusal tests:
    deny: bool = False
    wrong_nonce: bool = False
    audience: str = CLIENT_ID
    sign_with_stranger: bool = False
    key: Any = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    stranger: Any = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    authorize_seen: list[dict[str, str]] = field(default_factory=list)
    token_refusals: list[str] = field(default_factory=list)
    logouts: list[dict[str, str]] = field(default_factory=list)
    offers_logout: bool = True

    def jwks(self) -> dict[str, Any]:
        public = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [public | {"kid": "idp-1", "use": "sig", "alg": "RS256"}]}

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + "/authorize",
            "token_endpoint": self.issuer + "/token",
            "jwks_uri": self.issuer + "/certs",
        } | ({"end_session_endpoint": self.issuer + "/logout"} if self.offers_logout else {})

    def authorize(self, query: dict[str, str]) -> str:
        """Where the provider sends the browser back after its (instant) sign-in."""
        self.authorize_seen.append(query)
        back = query["redirect_uri"]
        if self.deny:
            answer = {"error": "access_denied", "error_description": "<b>no</b>"}
        else:
            code = secrets.token_urlsafe(16)
            self.codes[code] = query
            answer = {"code": code}
        return back + "?" + urlencode(answer | {"state": query.get("state", "")})

    def token(self, form: dict[str, str], basic: str | None) -> tuple[int, dict[str, Any]]:
        asked = self.codes.pop(form.get("code", ""), None)  # a code works once
        expected_basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        verifier = form.get("code_verifier", "")
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        problem = None
        if asked is None:
            problem = "unknown or used code"
        elif form.get("grant_type") != "authorization_code":
            problem = "grant type"
        elif form.get("redirect_uri") != asked["redirect_uri"]:
            problem = "redirect uri"
        elif basic != f"Basic {expected_basic}":
            problem = "client authentication"
        elif asked.get("code_challenge_method") != "S256" or challenge != asked["code_challenge"]:
            problem = "pkce"
        if problem is not None or asked is None:
            self.token_refusals.append(problem or "?")
            return 400, {"error": "invalid_grant"}
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": self.person.sub,
            "iat": now,
            "exp": now + 300,
            "nonce": "another-sign-in" if self.wrong_nonce else asked["nonce"],
            "preferred_username": self.person.username,
            "groups": self.person.groups,
        }
        signing = self.stranger if self.sign_with_stranger else self.key
        id_token = jwt.encode(claims, signing, algorithm="RS256", headers={"kid": "idp-1"})
        return 200, {"id_token": id_token, "access_token": "opaque", "token_type": "Bearer"}


def _handler(provider: Provider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _json(self, status: int, body: dict[str, Any]) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/.well-known/openid-configuration":
                self._json(200, provider.discovery())
            elif url.path == "/certs":
                self._json(200, provider.jwks())
            elif url.path == "/logout":
                # The provider ends its session and, for its own client, sends the browser
                # back where the client asked.
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                provider.logouts.append(query)
                self.send_response(302)
                self.send_header("Location", query.get("post_logout_redirect_uri", "/"))
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif url.path == "/authorize":
                # The provider's own page, as a real one shows (its sign-in form): the way
                # back is a navigation that this page, on the provider's site, begins.
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                back = html.escape(provider.authorize(query), quote=True)
                name = html.escape(provider.person.username)
                raw = f'<!doctype html><a id="continue" href="{back}">Continue as {name}</a>'
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(raw.encode())))
                self.end_headers()
                self.wfile.write(raw.encode())
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            status, body = provider.token(form, self.headers.get("Authorization"))
            self._json(status, body)

        def log_message(self, *_: Any) -> None:
            pass

    return Handler


@contextmanager
def serving(provider: Provider) -> Iterator[Provider]:
    """The provider on a free port of 127.0.0.1, named by ``provider.host``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(provider))
    provider.issuer = f"http://{provider.host}:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
