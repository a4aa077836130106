"""The review in a real browser: headless Chromium (Debian's package) driven by
Playwright against `synthray` served by uvicorn. A reviewer signs in, opens an export,
sees its evidence images, rejects one export and approves another; the partner then sees
and downloads only the approved one, and a partner guessing another partner's export gets
the same page as a missing one. Screenshots go to var/test-artefacts/screenshots (or
SYNTHRAY_TEST_ARTEFACTS), outside git."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import World
from fastapi.testclient import TestClient
from support import CHROMIUM, SHOTS, Keys, auth, built_export, needs_chromium, served

from synthray.config import Settings

playwright = pytest.importorskip("playwright.sync_api")

pytestmark = needs_chromium()


@pytest.fixture
def server(settings: Settings, trained: World) -> Iterator[str]:
    with served(settings) as url:
        yield url


def _sign_in(page: playwright.Page, base: str, key: str) -> None:
    page.goto(f"{base}/ui")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/ui/exports")


def _shot(page: playwright.Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png", full_page=True)


def _images_drawn(page: playwright.Page, selector: str) -> int:
    """How many images matching ``selector`` the browser decoded (not broken)."""
    count: int = page.eval_on_selector_all(
        selector, "els => els.filter(e => e.complete && e.naturalWidth > 0).length"
    )
    return count


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_review_then_partner_download_in_chromium(
    server: str, client: TestClient, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    rejected = built_export(client, keys.operator, settings, seed=21)
    approved = built_export(client, keys.operator, settings, seed=22)
    theirs = built_export(client, keys.operator, settings, seed=23, partner="partner-b")
    r = client.post(
        f"/v1/exports/{theirs}/approve", json={"comment": "ok"}, headers=auth(keys.reviewer)
    )
    assert r.status_code == 200

    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            reviewer = browser.new_context(viewport={"width": 1280, "height": 900})
            page = reviewer.new_page()
            _sign_in(page, server, keys.reviewer)
            queue = page.locator("main")
            playwright.expect(queue).to_contain_text("awaiting review")
            playwright.expect(page.get_by_role("link", name=f"Export {approved}")).to_be_visible()
            _shot(page, "1-reviewer-queue")

            page.get_by_role("link", name=f"Export {rejected}", exact=True).click()
            playwright.expect(page.locator("h1")).to_contain_text(f"Export {rejected}")
            playwright.expect(page.get_by_text("Memorization gate")).to_be_visible()
            # The gallery of synthetic images and the evidence rows (each a synthetic image
            # beside its nearest training images) are drawn, not broken.
            assert _images_drawn(page, ".gallery img") >= 4
            assert _images_drawn(page, ".evidence img") >= 2
            _shot(page, "2-reviewer-export-evidence")
            page.get_by_label("Reason for rejecting").fill("too few images per class to share")
            page.get_by_role("button", name="Reject").click()
            playwright.expect(page.locator("h1 .state")).to_have_text("rejected")
            playwright.expect(page.locator("ul.reviews")).to_contain_text("too few images")
            _shot(page, "3-reviewer-rejected")

            page.goto(f"{server}/ui/exports/{approved}")
            page.get_by_label("Comment (what you looked at)").fill("gallery and evidence read")
            page.get_by_role("button", name="Approve").click()
            playwright.expect(page.locator("h1 .state")).to_have_text("approved")
            _shot(page, "4-reviewer-approved")
            # Jobs show live progress: the page's script polls the API with the cookie.
            page.get_by_role("link", name="Jobs").click()
            playwright.expect(page.locator("#live")).to_contain_text("last update", timeout=8000)
            playwright.expect(page.locator("tr[data-job]").first).to_be_visible()
            _shot(page, "4b-reviewer-jobs")
            reviewer.close()

            partner = browser.new_context(accept_downloads=True)
            page = partner.new_page()
            _sign_in(page, server, keys.partner)
            rows = page.locator("table.list tbody tr")
            playwright.expect(rows).to_have_count(1)
            playwright.expect(rows.first).to_contain_text(f"Export {approved}")
            _shot(page, "5-partner-exports")
            page.get_by_role("link", name=f"Export {approved}").click()
            playwright.expect(page.get_by_role("heading", name="Privacy scorecard")).to_be_visible()
            assert page.locator("img").count() == 0  # no image of anyone on a partner page
            _shot(page, "6-partner-export")
            with page.expect_download() as info:
                page.get_by_role("link", name="Download the bundle (zip)").click()
            target = tmp_path / "bundle.zip"
            info.value.save_as(target)
            sha = hashlib.sha256(target.read_bytes()).hexdigest()
            playwright.expect(page.locator("code", has_text=sha)).to_be_visible()

            def seen(export_id: int) -> str:
                response = page.goto(f"{server}/ui/exports/{export_id}")
                assert response is not None and response.status == 404
                return page.locator("main").inner_text().replace(str(export_id), "N")

            missing = seen(987_654)
            assert seen(theirs) == missing
            assert seen(rejected) == missing
            _shot(page, "7-partner-guessing")
            partner.close()
        finally:
            browser.close()

    states = {
        e["id"]: e["state"] for e in client.get("/v1/exports", headers=auth(keys.admin)).json()
    }
    assert states[rejected] == "rejected" and states[approved] == "approved"
    trail = client.get("/v1/audit", headers=auth(keys.admin)).json()
    actions = [(e["action"], e["actor_name"], e["object_id"]) for e in trail]
    assert ("view_evidence", "reviewer", str(rejected)) in actions
    assert ("download_export", "partner-a", str(approved)) in actions
