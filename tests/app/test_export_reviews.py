"""A second pair of eyes before anything leaves the building: the key that requested an
export can never approve it (admins included), a site can require several distinct
approvals, and one rejection ends an export, its reason kept for staff and hidden from
the partner. Real batches through the gate, both databases."""

from __future__ import annotations

from conftest import World
from fastapi.testclient import TestClient
from support import Keys, auth, built_export

from synthray.config import Settings


def _key(client: TestClient, admin: str, name: str, role: str) -> str:
    r = client.post("/v1/keys", json={"name": name, "role": role}, headers=auth(admin))
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def test_the_requester_cannot_approve_even_as_admin(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    export_id = built_export(client, keys.admin, settings, seed=1)
    r = client.post(f"/v1/exports/{export_id}/approve", headers=auth(keys.admin))
    assert r.status_code == 403 and "second person" in r.json()["detail"]
    refused = [
        e
        for e in client.get("/v1/audit", headers=auth(keys.admin)).json()
        if e["action"] == "approve_export"
    ]
    assert refused[0]["outcome"] == "refused" and "two-person" in refused[0]["detail"]["reason"]
    ok = client.post(
        f"/v1/exports/{export_id}/approve",
        json={"comment": "gallery looked at; no flagged image"},
        headers=auth(keys.reviewer),
    )
    assert ok.status_code == 200 and ok.json()["state"] == "approved", ok.text
    assert ok.json()["reviews"][0]["comment"] == "gallery looked at; no flagged image"
    assert (
        client.get(f"/v1/exports/{export_id}/download", headers=auth(keys.partner)).status_code
        == 200
    )


def test_a_site_can_require_two_distinct_approvals(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    settings.export_approvals = 2
    second = _key(client, keys.admin, "second-reviewer", "reviewer")
    export_id = built_export(client, keys.operator, settings, seed=2)
    url = f"/v1/exports/{export_id}/approve"
    first = client.post(url, headers=auth(keys.reviewer))
    assert first.status_code == 200 and first.json()["state"] == "awaiting_approval"
    # The same key twice is still one person.
    again = client.post(url, headers=auth(keys.reviewer))
    assert again.status_code == 409 and "already reviewed" in again.json()["detail"]
    download = f"/v1/exports/{export_id}/download"
    assert client.get(download, headers=auth(keys.partner)).status_code == 409
    done = client.post(url, headers=auth(second))
    assert done.status_code == 200 and done.json()["state"] == "approved"
    assert [r["decision"] for r in done.json()["reviews"]] == ["approve", "approve"]
    assert client.get(download, headers=auth(keys.partner)).status_code == 200
    # The partner sees its export, but not who requested or reviewed it.
    seen = client.get(f"/v1/exports/{export_id}", headers=auth(keys.partner)).json()
    assert seen["reviews"] == [] and seen["requested_by"] is None


def test_a_rejection_ends_the_export_with_its_reason(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    export_id = built_export(client, keys.operator, settings, seed=3)
    url = f"/v1/exports/{export_id}/reject"
    for bad in ({}, {"comment": ""}, {"comment": "x" * 2001}):
        r = client.post(url, json=bad, headers=auth(keys.reviewer))
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "comment", r.text
    assert client.post(url, json={"comment": "no"}, headers=auth(keys.operator)).status_code == 403
    reason = "row 3 shows a near-copy of a training film"
    r = client.post(url, json={"comment": reason}, headers=auth(keys.reviewer))
    assert r.status_code == 200 and r.json()["state"] == "rejected", r.text
    # Over for good: no approval, no download, nothing for the partner to see.
    r = client.post(f"/v1/exports/{export_id}/approve", headers=auth(keys.admin))
    assert r.status_code == 409 and "rejected" in r.json()["detail"]
    staff = client.get(f"/v1/exports/{export_id}", headers=auth(keys.operator)).json()
    assert staff["reviews"][0]["decision"] == "reject"
    assert staff["reviews"][0]["comment"] == reason
    assert client.get(f"/v1/exports/{export_id}", headers=auth(keys.partner)).status_code == 404
    assert client.get("/v1/exports", headers=auth(keys.partner)).json() == []
    r = client.get(f"/v1/exports/{export_id}/download", headers=auth(keys.partner))
    assert r.status_code == 409 and reason not in r.text
    trail = client.get("/v1/audit", headers=auth(keys.admin)).json()
    assert any(e["action"] == "reject_export" and e["detail"]["comment"] == reason for e in trail)


def test_a_new_partner_never_inherits_an_old_partners_exports_by_name(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    export_id = built_export(client, keys.operator, settings, seed=4)
    url = f"/v1/exports/{export_id}/approve"
    assert client.post(url, headers=auth(keys.reviewer)).json()["state"] == "approved"
    admin = auth(keys.admin)
    old = next(k for k in client.get("/v1/keys", headers=admin).json() if k["name"] == "partner-a")
    assert client.delete(f"/v1/keys/{old['id']}", headers=admin).status_code == 200
    # Someone else given the old partner's name: refused, revoked key or not.
    r = client.post("/v1/keys", json={"name": "partner-a", "role": "partner"}, headers=admin)
    assert r.status_code == 409 and "of this name already has keys" in r.json()["detail"], r.text
    for bad in (
        {"name": "newcomer", "role": "partner", "same_partner": True},  # no such partner
        {"name": "staff-x", "role": "reviewer", "same_partner": True},  # not a partner key
    ):
        r = client.post("/v1/keys", json=bad, headers=admin)
        assert r.status_code == 422 and r.json()["field"] == "same_partner", r.text
    # The same partner's next key, said so explicitly, sees its export.
    body = {"name": "partner-a", "role": "partner", "same_partner": True}
    r = client.post("/v1/keys", json=body, headers=admin)
    assert r.status_code == 201, r.text
    rotated = auth(r.json()["key"])
    assert [e["id"] for e in client.get("/v1/exports", headers=rotated).json()] == [export_id]
    assert client.get(f"/v1/exports/{export_id}/download", headers=rotated).status_code == 200
    created = [
        e for e in client.get("/v1/audit", headers=admin).json() if e["action"] == "create_key"
    ]
    assert created[-1]["detail"] == {"role": "partner", "same_partner": True}
