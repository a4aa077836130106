"""Staff sign-in with identity-provider tokens (OWASP API2, broken authentication): a small
local issuer (real RSA and EC key pairs, tokens signed by PyJWT) against the real app on
both databases. Every forged, stale or misdirected token is refused with 401 and audited;
a valid token without a mapped group is refused with 403; a valid one acts with the role
its groups give, under an identity row an admin can revoke."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import make_settings
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from support import Keys, auth, make_keys

from synthray.app.main import create_app
from synthray.config import Settings

ISSUER = "https://idp.hospital.example/realms/staff"
AUDIENCE = "synthray"
ROLES = "radiology-ops=operator,privacy-office=reviewer,synthray-admins=admin"


class Issuer:
    """A test identity provider: two signing keys in its JWKS, one key it never publishes."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(ECAlgorithm.to_jwk(self.ec.public_key()))
        return {
            "keys": [
                rsa_jwk | {"kid": "rsa-1", "use": "sig", "alg": "RS256"},
                ec_jwk | {"kid": "ec-1", "use": "sig", "alg": "ES256"},
            ]
        }

    def token(
        self,
        *,
        sub: str = "u-1001",
        groups: list[str] | None = None,
        key: Any = None,
        alg: str = "RS256",
        kid: str = "rsa-1",
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": now,
            "exp": now + 300,
            "preferred_username": f"user {sub}",
            "groups": ["radiology-ops"] if groups is None else groups,
        } | claims
        signing = key if key is not None else (self.ec if alg.startswith("ES") else self.rsa)
        return jwt.encode(body, signing, algorithm=alg, headers={"kid": kid})


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
def jwks_file(tmp_path: Path, issuer: Issuer) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    return path


@pytest.fixture
def oidc_settings(tmp_path: Path, database_url: str, jwks_file: Path) -> Settings:
    return make_settings(
        tmp_path,
        database_url,
        oidc_issuer=ISSUER,
        oidc_audience=AUDIENCE,
        oidc_jwks=str(jwks_file),
        oidc_roles=ROLES,
    )


@pytest.fixture
def oidc_client(oidc_settings: Settings) -> Iterator[tuple[TestClient, Keys]]:
    keys = make_keys(oidc_settings)
    with TestClient(create_app(oidc_settings), raise_server_exceptions=False) as c:
        yield c, keys


def _unsigned(issuer: Issuer) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "iat": now, "exp": now + 60}
    return jwt.encode(body, None, algorithm="none", headers={"kid": "rsa-1"})


def _hmac_with_public_key(issuer: Issuer) -> str:
    """The algorithm-confusion attack: HS256 "signed" with the published public key."""
    import base64
    import hashlib
    import hmac as hmac_mod

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    pem = issuer.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "iat": now, "exp": now + 60}
    payload = b64(json.dumps(body).encode())
    sig = hmac_mod.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(sig)}"


REFUSED: dict[str, Any] = {
    "alg none": _unsigned,
    "HS256 with the public key": _hmac_with_public_key,
    "signed by an unpublished key": lambda i: i.token(key=i.stranger),
    "unknown kid": lambda i: i.token(kid="rotated-away"),
    "expired": lambda i: i.token(exp=int(time.time()) - 120, iat=int(time.time()) - 600),
    "not yet valid": lambda i: i.token(nbf=int(time.time()) + 600),
    "wrong audience": lambda i: i.token(aud="another-service"),
    "wrong issuer": lambda i: i.token(iss="https://evil.example/"),
    "no subject": lambda i: jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "iat": int(time.time()), "exp": int(time.time()) + 60},
        i.rsa,
        algorithm="RS256",
        headers={"kid": "rsa-1"},
    ),
    "tampered payload": lambda i: _tamper(i.token(groups=["radiology-ops"])),
    "garbage": lambda i: "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",
}


def _tamper(token: str) -> str:
    import base64

    header, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["groups"] = ["synthray-admins"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{sig}"


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_forged_stale_or_misdirected_tokens_are_refused_and_audited(
    oidc_client: tuple[TestClient, Keys], issuer: Issuer, case: str
) -> None:
    client, keys = oidc_client
    r = client.get("/v1/me", headers=auth(REFUSED[case](issuer)))
    assert r.status_code == 401, (case, r.status_code, r.text)
    assert "traceback" not in r.text.lower()
    trail = client.get("/v1/audit", headers=auth(keys.admin)).json()
    refusals = [e for e in trail if e["outcome"] == "refused" and e["object_id"] == "GET /v1/me"]
    assert refusals, trail


def test_a_valid_token_acts_with_the_role_its_groups_give(
    oidc_client: tuple[TestClient, Keys], issuer: Issuer
) -> None:
    client, keys = oidc_client
    ops = issuer.token(sub="u-7", groups=["radiology-ops", "unrelated"])
    me = client.get("/v1/me", headers=auth(ops))
    assert me.status_code == 200, me.text
    assert me.json()["role"] == "operator" and me.json()["name"] == "oidc:user_u-7"
    # The role decides, as for keys: an operator may not list keys or approve exports.
    assert client.get("/v1/keys", headers=auth(ops)).status_code == 403
    assert client.get("/v1/datasets", headers=auth(ops)).status_code == 200
    # An EC-signed token from the same provider works too; the role follows the groups.
    reviewer = issuer.token(sub="u-7", groups=["privacy-office"], alg="ES256", kid="ec-1")
    assert client.get("/v1/me", headers=auth(reviewer)).json()["role"] == "reviewer"
    admin = issuer.token(sub="u-9", groups=["synthray-admins", "radiology-ops"])
    assert client.get("/v1/me", headers=auth(admin)).json()["role"] == "admin"
    # One identity row per person, visible to admins beside the API keys.
    listed = client.get("/v1/keys", headers=auth(keys.admin)).json()
    people = [k for k in listed if k["prefix"] == "oidc"]
    assert sorted(k["name"] for k in people) == ["oidc:user_u-7", "oidc:user_u-9"]


def test_a_valid_token_without_a_mapped_group_is_forbidden(
    oidc_client: tuple[TestClient, Keys], issuer: Issuer
) -> None:
    client, _ = oidc_client
    for groups in ([], ["cafeteria"]):
        r = client.get("/v1/me", headers=auth(issuer.token(sub="u-2", groups=groups)))
        assert r.status_code == 403, r.text
        assert "no group" in r.json()["detail"]


def test_an_admin_can_revoke_a_person_whose_tokens_are_still_valid(
    oidc_client: tuple[TestClient, Keys], issuer: Issuer
) -> None:
    client, keys = oidc_client
    token = issuer.token(sub="u-3")
    assert client.get("/v1/me", headers=auth(token)).status_code == 200
    person = next(
        k for k in client.get("/v1/keys", headers=auth(keys.admin)).json() if k["prefix"] == "oidc"
    )
    assert client.delete(f"/v1/keys/{person['id']}", headers=auth(keys.admin)).status_code == 200
    r = client.get("/v1/me", headers=auth(issuer.token(sub="u-3")))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_api_keys_still_work_beside_tokens(oidc_client: tuple[TestClient, Keys]) -> None:
    client, keys = oidc_client
    assert client.get("/v1/me", headers=auth(keys.reviewer)).json()["role"] == "reviewer"
    assert client.get("/v1/me", headers={"X-API-Key": keys.operator}).status_code == 200


class _JwksHandler(BaseHTTPRequestHandler):
    body = b""
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_: Any) -> None:
        pass


def test_keys_fetched_from_the_providers_jwks_url(
    tmp_path: Path, database_url: str, issuer: Issuer
) -> None:
    _JwksHandler.body = json.dumps(issuer.jwks()).encode()
    _JwksHandler.hits = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JwksHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/realms/staff/certs"
        s = make_settings(
            tmp_path,
            database_url,
            oidc_issuer=ISSUER,
            oidc_audience=AUDIENCE,
            oidc_jwks=url,
            oidc_roles=ROLES,
        )
        make_keys(s)
        with TestClient(create_app(s), raise_server_exceptions=False) as client:
            for _ in range(3):
                me = client.get("/v1/me", headers=auth(issuer.token(sub="u-5")))
                assert me.status_code == 200, me.text
            assert _JwksHandler.hits == 1  # cached, not fetched per request
            r = client.get("/v1/me", headers=auth(issuer.token(key=issuer.stranger)))
            assert r.status_code == 401
    finally:
        server.shutdown()


def test_misconfigured_oidc_refuses_to_start(tmp_path: Path, database_url: str) -> None:
    with pytest.raises(ValueError, match="SYNTHRAY_OIDC_AUDIENCE"):
        make_settings(tmp_path, database_url, oidc_issuer=ISSUER, oidc_roles=ROLES)
    with pytest.raises(ValueError, match="group=role"):
        make_settings(
            tmp_path,
            database_url,
            oidc_issuer=ISSUER,
            oidc_audience=AUDIENCE,
            oidc_jwks="/x",
            oidc_roles="radiology-ops=partner",
        )
