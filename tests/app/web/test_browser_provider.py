"""Staff sign-in through the identity provider in a real browser: headless Chromium
(Debian's package) driven by Playwright, the app served by uvicorn on 127.0.0.1 and the
test provider on ``localhost``, so that, as in a hospital, the provider is another site
and the browser applies its cross-site cookie rules to the way back. Screenshots go to
var/test-artefacts/screenshots (or SYNTHRAY_TEST_ARTEFACTS), outside git."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_settings
from oidc_provider import API_AUDIENCE, CLIENT_ID, CLIENT_SECRET, Person, Provider, serving
from support import CHROMIUM, SHOTS, needs_chromium, served

from synthray.app.web import provider as web_provider

playwright = pytest.importorskip("playwright.sync_api")

pytestmark = needs_chromium()


@pytest.fixture
def idp() -> Iterator[Provider]:
    with serving(Provider(host="localhost")) as p:
        yield p
    web_provider._discovered.clear()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_staff_sign_in_at_the_provider_in_chromium(
    tmp_path: Path, database_url: str, idp: Provider
) -> None:
    settings = make_settings(
        tmp_path,
        database_url,
        oidc_issuer=idp.issuer,
        oidc_audience=API_AUDIENCE,
        oidc_jwks=idp.issuer + "/certs",
        oidc_roles="radiology-ops=operator,privacy-office=reviewer",
        oidc_client_id=CLIENT_ID,
        oidc_client_secret=CLIENT_SECRET,
    )
    idp.person = Person(sub="u-31", username="dr.franklin", groups=["privacy-office"])
    with served(settings) as base, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(f"{base}/ui/audit")  # a reviewer's page, asked for signed out
            page.wait_for_url(f"{base}/ui/signin**")
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=SHOTS / "provider-signin.png", full_page=True)
            page.get_by_role("link", name="Sign in with the hospital's identity provider").click()
            # Off to the provider on another site; its page sends the browser back, and
            # the app on to the page asked for.
            page.wait_for_url(f"{idp.issuer}/authorize**")
            page.get_by_role("link", name="Continue as dr.franklin").click()
            page.wait_for_url(f"{base}/ui/audit", timeout=15_000)
            assert len(idp.authorize_seen) == 1 and idp.token_refusals == []
            header = page.locator("header").inner_text()
            assert "oidc:dr.franklin (reviewer)" in header
            assert "sign_in" in page.locator("main").inner_text()  # the trail shows it
            page.screenshot(path=SHOTS / "provider-signed-in.png", full_page=True)
            # Signing out ends the session here; the next page asks to sign in again.
            page.get_by_role("button", name="Sign out").click()
            page.goto(f"{base}/ui/audit")
            page.wait_for_url(f"{base}/ui/signin**")
        finally:
            browser.close()
