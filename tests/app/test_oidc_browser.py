"""Staff sign-in to the pages through the hospital's identity provider (the authorization
code flow with PKCE), against a small provider served over real HTTP and the real app on
both databases. A sign-in opens a browser session with the role the person's groups give;
an answer that does not belong to this browser's sign-in, a code the provider will not
honour, an ID token for another client or another sign-in, a person without a mapped
group or one an admin revoked: each is refused, audited, and leaves no session."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import make_settings
from fastapi.testclient import TestClient
from oidc_provider import API_AUDIENCE, CLIENT_ID, CLIENT_SECRET, Person, Provider, serving
from pages import csrf_of, sign_in
from support import Keys, auth, make_keys

from synthray.app.main import create_app
from synthray.app.web import provider as web_provider
from synthray.config import Settings

ROLES = "radiology-ops=operator,privacy-office=reviewer,synthray-admins=admin"


@pytest.fixture
def idp() -> Iterator[Provider]:
    with serving(Provider()) as p:
        yield p
    web_provider._discovered.clear()


def provider_settings(tmp_path: Path, database_url: str, issuer: str) -> Settings:
    return make_settings(
        tmp_path,
        database_url,
        oidc_issuer=issuer,
        oidc_audience=API_AUDIENCE,
        oidc_jwks=issuer + "/certs",
        oidc_roles=ROLES,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret=CLIENT_SECRET,
    )


@pytest.fixture
def app(tmp_path: Path, database_url: str, idp: Provider) -> Iterator[tuple[TestClient, Keys]]:
    settings = provider_settings(tmp_path, database_url, idp.issuer)
    keys = make_keys(settings)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c, keys


def start(client: TestClient, next_page: str = "") -> str:
    """Begin a sign-in; the provider's authorization URL it sends the browser to."""
    r = client.get("/ui/signin/provider", params={"next": next_page}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["cache-control"] == "no-store"
    return r.headers["location"]


def at_provider(authorize_url: str) -> str:
    """The browser at the provider: where it is sent back to (a path of the app)."""
    r = httpx.get(authorize_url, follow_redirects=False)
    assert r.status_code == 200
    found = re.search(r'href="([^"]+)"', r.text)
    assert found is not None, r.text
    back = urlsplit(html.unescape(found.group(1)))
    assert back.netloc == "testserver"
    return f"{back.path}?{back.query}"


def refusals(client: TestClient, keys: Keys) -> list[dict[str, str]]:
    trail = client.get("/v1/audit", headers=auth(keys.admin)).json()
    return [e for e in trail if e["action"] == "sign_in" and e["outcome"] == "refused"]


def test_a_provider_sign_in_opens_a_session_with_the_groups_role(
    app: tuple[TestClient, Keys], idp: Provider
) -> None:
    client, keys = app
    page = client.get("/ui/signin")
    assert "/ui/signin/provider" in page.text  # the sign-in page offers the provider
    authorize = start(client, "/ui/datasets")
    query = {k: v[0] for k, v in parse_qs(urlsplit(authorize).query).items()}
    assert authorize.startswith(idp.issuer + "/authorize?")
    assert query["client_id"] == CLIENT_ID and query["response_type"] == "code"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["redirect_uri"] == "http://testserver/ui/signin/provider/callback"
    assert "openid" in query["scope"].split()
    assert query["state"] != query["nonce"]

    done = client.get(at_provider(authorize))
    assert done.status_code == 200, done.text
    assert idp.token_refusals == []  # secret, redirect URI and PKCE verifier all checked
    assert "Signed in as oidc:dr.lovelace (operator)" in done.text
    assert 'url=/ui/datasets"' in done.text  # on to the page asked for
    assert "synthray_session" in client.cookies
    # The session acts as the person, with the role their groups give.
    me = client.get("/v1/me")
    assert me.status_code == 200 and me.json() == me.json() | {
        "name": "oidc:dr.lovelace",
        "role": "operator",
    }
    assert client.get("/ui/datasets").status_code == 200
    assert client.get("/ui/keys").status_code == 403  # operators do not manage keys
    # The same identity row a bearer token of this person would use.
    people = [k for k in client.get("/v1/keys", headers=auth(keys.admin)).json()]
    assert [k["name"] for k in people if k["prefix"] == "oidc"] == ["oidc:dr.lovelace"]
    trail = client.get("/v1/audit", headers=auth(keys.admin)).json()
    assert any(e["action"] == "sign_in" and e["outcome"] == "ok" for e in trail)


def test_an_answer_for_another_browsers_sign_in_is_refused(
    app: tuple[TestClient, Keys], idp: Provider, tmp_path: Path
) -> None:
    """Login CSRF: an attacker's own callback URL, planted in a victim's browser, must not
    sign the victim in as the attacker."""
    client, keys = app
    attacker = TestClient(client.app, raise_server_exceptions=False)
    planted = at_provider(start(attacker))
    start(client)  # the victim's own sign-in, under way
    r = client.get(planted)
    assert r.status_code == 401
    assert "does not belong to this browser" in r.text
    assert "synthray_session" not in client.cookies
    # No flow cookie at all (it expired, or the browser never began here): refused too.
    fresh = TestClient(client.app, raise_server_exceptions=False)
    r = fresh.get(planted)
    assert r.status_code == 401 and "took too long" in r.text
    assert len(refusals(client, keys)) == 2


@pytest.mark.parametrize(
    ("misbehaviour", "reason"),
    [
        ("deny", "did not sign this person in"),
        ("wrong_nonce", "belongs to another sign-in"),
        ("audience", "not issued for this service"),
        ("sign_with_stranger", "invalid token"),
        ("replayed_code", "did not accept the sign-in code"),
    ],
)
def test_a_provider_answer_that_does_not_hold_is_refused(
    app: tuple[TestClient, Keys], idp: Provider, misbehaviour: str, reason: str
) -> None:
    client, keys = app
    if misbehaviour == "audience":
        idp.audience = API_AUDIENCE  # an ID token for another client of the same provider
    elif misbehaviour != "replayed_code":
        setattr(idp, misbehaviour, True)
    back = at_provider(start(client))
    if misbehaviour == "replayed_code":
        code = parse_qs(urlsplit(back).query)["code"][0]
        idp.codes.pop(code)  # somebody else used it first
    r = client.get(back)
    assert r.status_code == 401, r.text
    assert reason in r.text
    assert "<b>no</b>" not in r.text  # the provider's own words are not echoed
    assert "synthray_session" not in client.cookies
    assert client.get("/v1/me").status_code == 401
    assert len(refusals(client, keys)) == 1


def test_a_person_without_a_mapped_group_gets_no_session(
    app: tuple[TestClient, Keys], idp: Provider
) -> None:
    client, keys = app
    idp.person = Person(sub="u-9", username="visitor", groups=["cafeteria"])
    r = client.get(at_provider(start(client)))
    assert r.status_code == 403 and "no group" in r.text
    assert "synthray_session" not in client.cookies
    assert len(refusals(client, keys)) == 1


def test_revoking_the_person_ends_their_session_and_their_next_sign_in(
    app: tuple[TestClient, Keys], idp: Provider
) -> None:
    client, keys = app
    idp.person = Person(sub="u-7", username="reviewer.one", groups=["privacy-office"])
    assert client.get(at_provider(start(client))).status_code == 200
    assert client.get("/v1/me").json()["role"] == "reviewer"
    person = next(
        k for k in client.get("/v1/keys", headers=auth(keys.admin)).json() if k["prefix"] == "oidc"
    )
    assert client.delete(f"/v1/keys/{person['id']}", headers=auth(keys.admin)).status_code == 200
    assert client.get("/v1/me").status_code == 401  # the open session ended at once
    r = client.get(at_provider(start(client)))
    assert r.status_code == 401 and "revoked" in r.text


def test_signing_out_ends_the_session_at_the_provider_too(
    app: tuple[TestClient, Keys], idp: Provider
) -> None:
    """RP-initiated logout: the session ends here, then the browser is sent to the
    provider's end-session endpoint with this client's id and the way back, so the
    provider's own session cannot sign the next person at the browser straight back in.
    A key's session, or a provider without the endpoint, signs out here only."""
    client, keys = app
    landing = client.get(at_provider(start(client)))
    assert landing.status_code == 200
    csrf = csrf_of(client.get("/ui/datasets").text)
    r = client.post("/ui/signout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    target = urlsplit(r.headers["location"])
    query = {k: v[0] for k, v in parse_qs(target.query).items()}
    assert f"{target.scheme}://{target.netloc}{target.path}" == idp.issuer + "/logout"
    assert query == {
        "client_id": CLIENT_ID,
        "post_logout_redirect_uri": "http://testserver/ui/signin",
    }
    assert client.get("/v1/me").status_code == 401  # ended here before the provider's turn
    back = httpx.get(r.headers["location"], follow_redirects=False)
    assert back.headers["location"] == "http://testserver/ui/signin" and idp.logouts
    # An API key's browser session has nothing to end at the provider.
    sign_in(client, keys.operator)
    csrf = csrf_of(client.get("/ui/datasets").text)
    r = client.post("/ui/signout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/signin"
    # A provider that offers no end-session endpoint: sign-out ends the session here only.
    idp.offers_logout = False
    web_provider._discovered.clear()
    assert client.get(at_provider(start(client))).status_code == 200
    csrf = csrf_of(client.get("/ui/datasets").text)
    r = client.post("/ui/signout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/signin"
    assert client.get("/v1/me").status_code == 401


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_unreachable_provider_is_a_503_page_not_a_500(tmp_path: Path, database_url: str) -> None:
    settings = provider_settings(tmp_path, database_url, "http://127.0.0.1:9")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        r = client.get("/ui/signin/provider", follow_redirects=False)
        assert r.status_code == 503 and "cannot be reached" in r.text
        assert "Traceback" not in r.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_without_a_client_id_the_pages_take_keys_only(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert "/ui/signin/provider" not in client.get("/ui/signin").text
        assert client.get("/ui/signin/provider", follow_redirects=False).status_code == 404
        r = client.get("/ui/signin/provider/callback?code=x&state=y")
        assert r.status_code == 404
    with pytest.raises(ValueError, match="SYNTHRAY_OIDC_ISSUER"):
        make_settings(tmp_path, database_url, oidc_client_id=CLIENT_ID)
