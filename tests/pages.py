"""Signing in through the sign-in form, as a browser does, for the page tests."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from synthray.app.web.service import COOKIE

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def sign_in(client: TestClient, key: str) -> str:
    """Sign ``client`` in with ``key``; returns the CSRF token of its session."""
    form = client.get("/ui/signin")
    assert form.status_code == 200, form.text
    r = client.post(
        "/ui/signin", data={"key": key, "csrf": csrf_of(form.text)}, follow_redirects=False
    )
    assert r.status_code == 303, r.text
    assert client.cookies.get(COOKIE)
    landing = client.get(r.headers["location"])
    assert landing.status_code == 200, landing.text
    return csrf_of(landing.text)
