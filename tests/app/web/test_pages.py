"""The pages and their rules, through the sign-in form as a browser uses it: a role x page
matrix, CSRF on every form, the cookie's attributes, sessions that end, and partners who
cannot tell another partner's export from a missing one. Both databases, a real trained
generator and real batches through the gate."""

from __future__ import annotations

import re

import pytest
from conftest import World
from fastapi.testclient import TestClient
from pages import csrf_of, sign_in
from support import Keys, auth, built_export

from synthray.app.web.service import COOKIE
from synthray.config import Settings

OK, DENIED, SIGN_IN = 200, 403, 303


def _approved(client: TestClient, keys: Keys, settings: Settings, seed: int, partner: str) -> int:
    export_id = built_export(client, keys.operator, settings, seed=seed, partner=partner)
    r = client.post(
        f"/v1/exports/{export_id}/approve", json={"comment": "ok"}, headers=auth(keys.reviewer)
    )
    assert r.status_code == 200 and r.json()["state"] == "approved", r.text
    return export_id


@pytest.fixture
def approved(client: TestClient, keys: Keys, settings: Settings, trained: World) -> int:
    """An export approved for partner-a."""
    return _approved(client, keys, settings, seed=11, partner="partner-a")


def _pages(export_id: int) -> dict[str, dict[str, int]]:
    staff = {"admin": OK, "operator": OK, "reviewer": OK, "partner": DENIED, "none": SIGN_IN}
    return {
        "/ui/exports": staff | {"partner": OK},
        f"/ui/exports/{export_id}": staff | {"partner": OK},
        "/ui/datasets": staff,
        "/ui/models": staff,
        "/ui/models/m": staff,
        "/ui/jobs": staff,
        "/ui/batches": staff,
        "/ui/audit": staff | {"operator": DENIED},
        "/ui/keys": staff | {"operator": DENIED, "reviewer": DENIED},
    }


def test_role_by_page_matrix(
    client: TestClient, settings: Settings, keys: Keys, approved: int
) -> None:
    key_of = {
        "admin": keys.admin,
        "operator": keys.operator,
        "reviewer": keys.reviewer,
        "partner": keys.partner,
    }
    seen: dict[tuple[str, str], int] = {}
    expected: dict[tuple[str, str], int] = {}
    for role in ("admin", "operator", "reviewer", "partner", "none"):
        client.cookies.clear()
        if role != "none":
            sign_in(client, key_of[role])
        for path, by_role in _pages(approved).items():
            r = client.get(path, follow_redirects=False)
            seen[(role, path)] = r.status_code
            expected[(role, path)] = by_role[role]
            if r.status_code == SIGN_IN:
                assert r.headers["location"].startswith("/ui/signin?next=/ui/")
            if r.status_code in (OK, DENIED):
                assert r.headers["content-type"].startswith("text/html")
                assert r.headers["cache-control"] == "no-store"
                assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert seen == expected
    # A role refused a page is in the audit trail, as a refused API request is.
    refused = client.get(
        "/v1/audit", params={"object_type": "route"}, headers=auth(keys.admin)
    ).json()
    assert any(e["detail"]["reason"] == "role partner lacks the right" for e in refused)


def test_partner_sees_only_its_approved_exports_and_guessing_looks_missing(
    client: TestClient, settings: Settings, keys: Keys, approved: int
) -> None:
    other = _approved(client, keys, settings, seed=12, partner="partner-b")
    waiting = built_export(client, keys.operator, settings, seed=13, partner="partner-a")
    sign_in(client, keys.partner)
    listing = client.get("/ui/exports").text
    assert f"Export {approved}<" in listing
    assert f"Export {other}<" not in listing and f"Export {waiting}<" not in listing
    own = client.get(f"/ui/exports/{approved}")
    assert own.status_code == 200
    assert "README" in own.text and "Privacy scorecard" in own.text
    assert f'href="/v1/exports/{approved}/download"' in own.text
    # A partner page never shows an image, nor who requested or reviewed the export.
    assert "<img" not in own.text and "data:image" not in own.text
    assert "Reviews" not in own.text and "reviewer" not in own.text

    def missing_page(export_id: int) -> tuple[int, str]:
        r = client.get(f"/ui/exports/{export_id}")
        main = r.text[r.text.index("<main>") : r.text.index("</main>")]
        return r.status_code, main.replace(str(export_id), "N")

    absent = missing_page(999_999)
    assert absent[0] == 404
    assert missing_page(other) == absent  # another partner's
    assert missing_page(waiting) == absent  # its own, not approved yet
    # The cookie also signs the download (a GET), which is audited like any other.
    r = client.get(f"/v1/exports/{approved}/download")
    assert r.status_code == 200 and r.headers["etag"].strip('"') == r.headers["x-content-sha256"]
    assert client.get(f"/v1/exports/{other}/download").status_code == 404
    # A bundle damaged on disk: the page (which reads only its texts) and the download
    # (which hashes it all) both refuse it.
    _damage_member(settings, r.headers["x-content-sha256"], "README.txt")
    page = client.get(f"/ui/exports/{approved}")
    assert page.status_code == 409 and "integrity check" in page.text
    assert client.get(f"/v1/exports/{approved}/download").status_code == 409


def _damage_member(settings: Settings, sha256: str, member: str) -> None:
    """Flip one byte of a zip member's data in the stored blob."""
    import struct
    import zipfile

    from synthray.app.storage import BlobStore

    path = BlobStore(settings.blob_dir).path(sha256)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_forms_need_the_session_csrf_token_and_the_role(
    client: TestClient, settings: Settings, keys: Keys, trained: World
) -> None:
    export_id = built_export(client, keys.operator, settings, seed=14)
    token = sign_in(client, keys.reviewer)
    url = f"/ui/exports/{export_id}/approve"
    for bad in ({}, {"csrf": ""}, {"csrf": token[:-2] + "xx"}):
        r = client.post(url, data={"comment": "looks fine", **bad}, follow_redirects=False)
        assert r.status_code == 403 and "form has expired" in r.text
    # The cookie alone never changes anything through the API either.
    assert client.post(f"/v1/exports/{export_id}/approve").status_code == 401
    # A comment is required (the reviewer says what was looked at).
    r = client.post(url, data={"comment": "  ", "csrf": token}, follow_redirects=False)
    assert r.status_code == 422 and "needs a comment" in r.text
    state = client.get(f"/v1/exports/{export_id}", headers=auth(keys.admin)).json()["state"]
    assert state == "awaiting_approval"
    # A partner's session with its own valid token still may not approve.
    client.cookies.clear()
    partner_token = sign_in(client, keys.partner)
    r = client.post(url, data={"comment": "mine", "csrf": partner_token}, follow_redirects=False)
    assert r.status_code == 403 and "role may not" in r.text
    client.cookies.clear()
    sign_in(client, keys.reviewer)
    page = client.get(f"/ui/exports/{export_id}").text
    r = client.post(
        url,
        data={"comment": "gallery and evidence read", "csrf": csrf_of(page)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    state = client.get(f"/v1/exports/{export_id}", headers=auth(keys.admin)).json()["state"]
    assert state == "approved"


def test_session_cookie_attributes_and_its_end(
    client: TestClient, settings: Settings, keys: Keys
) -> None:
    form = client.get("/ui/signin")
    wrong = client.post(
        "/ui/signin", data={"key": "sr_nope_x", "csrf": csrf_of(form.text)}, follow_redirects=False
    )
    assert wrong.status_code == 401 and "not valid" in wrong.text
    # A sign-in form posted from elsewhere (no double-submit cookie) is refused.
    client.cookies.clear()
    forged = client.post(
        "/ui/signin", data={"key": keys.admin, "csrf": "forged"}, follow_redirects=False
    )
    assert forged.status_code == 403 and COOKIE not in forged.cookies
    form = client.get("/ui/signin")
    r = client.post(
        "/ui/signin",
        data={"key": keys.admin, "csrf": csrf_of(form.text), "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/exports"
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(COOKIE + "="))
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"httponly", "samesite", "max-age", "path"} <= attrs
    assert "samesite=strict" in cookie.lower()
    assert "secure" not in attrs  # plain HTTP here; over HTTPS (or the setting) it is Secure
    token = r.cookies[COOKIE]
    # The database holds only a digest of the cookie.
    audit = client.get("/v1/audit", headers=auth(keys.admin)).json()
    assert token not in str(audit)
    landing = client.get("/ui/keys").text
    # Sign-out ends the session on the server: the same cookie, replayed, is refused.
    r = client.post("/ui/signout", data={"csrf": csrf_of(landing)}, follow_redirects=False)
    assert r.status_code == 303
    client.cookies.set(COOKIE, token)
    assert client.get("/ui/keys", follow_redirects=False).status_code == 303
    assert client.get("/v1/keys").status_code == 401
    # Revoking a key ends its sessions at once.
    client.cookies.clear()
    reviewer_key = client.post(
        "/v1/keys", json={"name": "temp-reviewer", "role": "reviewer"}, headers=auth(keys.admin)
    ).json()
    sign_in(client, reviewer_key["key"])
    assert client.get("/ui/exports").status_code == 200
    client.delete(f"/v1/keys/{reviewer_key['id']}", headers=auth(keys.admin))
    assert client.get("/ui/exports", follow_redirects=False).status_code == 303


def _attributes(set_cookie: str) -> tuple[str, set[str]]:
    name_value, *attrs = [part.strip() for part in set_cookie.split(";")]
    return name_value.split("=")[0], {a.lower() for a in attrs}


def test_secure_cookie_when_asked(settings: Settings, keys: Keys) -> None:
    from synthray.app.main import create_app

    settings.web_cookie_secure = True
    with TestClient(create_app(settings)) as c:
        name, attrs = _attributes(c.get("/ui/signin").headers["set-cookie"])
        assert name == "__Host-synthray_signin" and {"secure", "path=/"} <= attrs


def test_over_https_the_cookies_are_host_only_and_a_planted_one_is_ignored(
    settings: Settings, keys: Keys
) -> None:
    """Over HTTPS every cookie is ``__Host-``: Secure, Path=/, no Domain, so a sibling
    subdomain or a plain-HTTP page cannot plant a session (or a sign-in form token) that
    this site would read."""
    from synthray.app.main import create_app

    app = create_app(settings)
    with TestClient(app, base_url="https://testserver", raise_server_exceptions=False) as c:
        form = c.get("/ui/signin")
        name, attrs = _attributes(form.headers["set-cookie"])
        assert name == "__Host-synthray_signin"
        assert {"secure", "httponly", "path=/", "samesite=strict"} <= attrs
        assert not any(a.startswith("domain") for a in attrs)
        r = c.post(
            "/ui/signin",
            data={"key": keys.reviewer, "csrf": csrf_of(form.text)},
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text
        set_cookies = r.headers.get_list("set-cookie")
        session = next(h for h in set_cookies if h.startswith("__Host-synthray_session="))
        name, attrs = _attributes(session)
        assert {"secure", "httponly", "path=/", "samesite=strict"} <= attrs
        assert not any(a.startswith("domain") for a in attrs)
        # The form token's deletion is Secure too (a browser ignores it otherwise).
        cleared = next(h for h in set_cookies if h.startswith("__Host-synthray_signin="))
        assert {"secure", "max-age=0"} <= _attributes(cleared)[1]
        token = c.cookies.get("__Host-synthray_session")
        assert token and c.get("/ui/exports").status_code == 200
        assert c.get("/v1/me").json()["role"] == "reviewer"  # the cookie stands in on GET

        # The same valid token under the plain name, as a tossed cookie would arrive, does
        # not sign a browser in over HTTPS; nor does a plain-named form token pass the check.
        planted = TestClient(app, base_url="https://testserver", raise_server_exceptions=False)
        planted.cookies.set(COOKIE, token)
        assert planted.get("/ui/exports", follow_redirects=False).status_code == 303
        assert planted.get("/v1/me").status_code == 401
        planted.cookies.set("synthray_signin", "t" * 43)
        r = planted.post("/ui/signin", data={"key": keys.reviewer, "csrf": "t" * 43})
        assert r.status_code == 403 and "expired" in r.text

        # Signing out clears the __Host- cookie with a Secure deletion.
        landing = c.get("/ui/exports").text
        r = c.post("/ui/signout", data={"csrf": csrf_of(landing)}, follow_redirects=False)
        assert r.status_code == 303
        gone = r.headers["set-cookie"]
        assert gone.startswith("__Host-synthray_session=") and "secure" in gone.lower()
        assert c.get("/v1/me").status_code == 401


def test_admin_creates_and_revokes_keys_in_the_page(
    client: TestClient, keys: Keys, settings: Settings
) -> None:
    token = sign_in(client, keys.admin)
    r = client.post("/ui/keys", data={"name": "new-partner", "role": "partner", "csrf": token})
    assert r.status_code == 200
    new_key = re.search(r'id="new-key">([^<]+)<', r.text)
    assert new_key and client.get("/v1/me", headers=auth(new_key.group(1))).status_code == 200
    bad = client.post("/ui/keys", data={"name": "bad name!", "role": "partner", "csrf": token})
    assert bad.status_code == 422 and "name" in bad.text
    listed = client.get("/v1/keys", headers=auth(keys.admin)).json()
    key_id = next(k["id"] for k in listed if k["name"] == "new-partner")
    r = client.post(f"/ui/keys/{key_id}/revoke", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303
    assert client.get("/v1/me", headers=auth(new_key.group(1))).status_code == 401
    trail = client.get("/ui/audit", params={"action": "revoke_key"}).text
    assert f"api_key {key_id}" in trail
    # The revoked partner's name takes the box that says it is the same partner.
    again = {"name": "new-partner", "role": "partner", "csrf": token}
    r = client.post("/ui/keys", data=again)
    assert r.status_code == 409 and "already has keys" in r.text
    r = client.post("/ui/keys", data=again | {"same_partner": "yes"})
    assert r.status_code == 200 and 'id="new-key"' in r.text


def test_error_pages_are_pages(client: TestClient, keys: Keys) -> None:
    sign_in(client, keys.reviewer)
    cases = (
        ("/ui/nowhere", 404),
        ("/ui/models/x/y/z", 404),
        ("/ui/exports/abc", 422),
        ("/ui/exports/0", 422),
        ("/ui/keys", 403),  # an admin's page
    )
    for path, status in cases:
        r = client.get(path)
        assert r.status_code == status, (path, r.text)
        assert r.headers["content-type"].startswith("text/html") and "<h1>" in r.text
        assert "Traceback" not in r.text
        # The reviewer keeps the navigation (and the sign-out) on an error page.
        assert 'href="/ui/jobs"' in r.text and 'action="/ui/signout"' in r.text, path
        assert 'href="/ui/keys"' not in r.text
    client.cookies.clear()
    r = client.get("/ui/nowhere", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/signin")


def test_operator_synthesizes_and_requests_an_export_from_the_pages(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    from support import run_queued

    token = sign_in(client, keys.operator)
    bad = client.post("/ui/synthesize", data={"model": "m", "per_class": "0", "csrf": token})
    assert bad.status_code == 422 and "per_class" in bad.text
    # A browser sends numbers as text; what is not a whole number is refused by name.
    for field, text in (("per_class", "3.5"), ("seed", "five")):
        form = {"model": "m", "per_class": "3", field: text, "csrf": token}
        bad = client.post("/ui/synthesize", data=form)
        assert bad.status_code == 422 and field in bad.text
    r = client.post(
        "/ui/synthesize",
        data={"model": "m", "per_class": "3", "seed": "5", "csrf": token},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    assert "synthesize" in client.get("/ui/jobs").text
    assert run_queued(settings) == ["succeeded", "succeeded"]
    batches = client.get("/ui/batches").text
    batch_id = max(b["id"] for b in client.get("/v1/batches", headers=auth(keys.operator)).json())
    assert f'name="batch_id" value="{batch_id}"' in batches
    r = client.post(
        "/ui/exports",
        data={"batch_id": str(batch_id), "partner": "partner-a", "csrf": token},
        follow_redirects=False,
    )
    assert r.status_code == 303
    export_id = int(r.headers["location"].rsplit("/", 1)[1])
    assert run_queued(settings) == ["succeeded"]
    page = client.get(f"/ui/exports/{export_id}").text
    assert "awaiting approval" in page
    # The operator requested it: there is no approval form for it on the operator's page.
    assert "/approve" not in page
    unknown = client.post(
        "/ui/exports", data={"batch_id": str(batch_id), "partner": "nobody", "csrf": token}
    )
    assert unknown.status_code in (404, 422) and "<h1>" in unknown.text


def test_operator_cancels_and_retries_a_job_from_the_jobs_page(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    op = auth(keys.operator)
    job_id = client.post("/v1/synthesize", json={"model": "m", "per_class": 3}, headers=op).json()[
        "job_id"
    ]
    token = sign_in(client, keys.operator)
    cancel, retry = f"/ui/jobs/{job_id}/cancel", f"/ui/jobs/{job_id}/retry"
    page = client.get("/ui/jobs").text
    assert f'action="{cancel}"' in page and f'action="{retry}"' not in page
    r = client.post(cancel, data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    assert client.get(f"/v1/jobs/{job_id}", headers=op).json()["state"] == "cancelled"

    page = client.get("/ui/jobs").text
    assert f'action="{retry}"' in page and f'action="{cancel}"' not in page
    r = client.post(retry, data={}, follow_redirects=False)  # no token: nothing changes
    assert r.status_code == 403
    assert client.get(f"/v1/jobs/{job_id}", headers=op).json()["state"] == "cancelled"
    r = client.post(retry, data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303
    assert client.get(f"/v1/jobs/{job_id}", headers=op).json()["state"] == "queued"
    again = client.post(retry, data={"csrf": token}, follow_redirects=False)
    assert again.status_code == 409 and "<h1>" in again.text
    assert "only a failed or cancelled job is retried" in again.text

    # A reviewer sees the jobs but no action, and its own valid token changes nothing.
    client.cookies.clear()
    reviewer_token = sign_in(client, keys.reviewer)
    page = client.get("/ui/jobs").text
    assert job_id[:8] in page and "/cancel" not in page and "/retry" not in page
    r = client.post(cancel, data={"csrf": reviewer_token}, follow_redirects=False)
    assert r.status_code == 403
    assert client.get(f"/v1/jobs/{job_id}", headers=op).json()["state"] == "queued"
