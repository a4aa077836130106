"""Health, auth, roles, and clear 4xx answers for bad requests (both databases)."""

from __future__ import annotations

import secrets

import pytest
from conftest import REDIS_URL
from fastapi.testclient import TestClient
from support import Keys, auth

from synthray.app.main import create_app
from synthray.config import Settings


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"database": "ok", "broker": "ok", "storage": "ok", "blob_store": "ok"}


def test_openapi_lists_v1(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/datasets" in paths and "/v1/exports/{export_id}/download" in paths


def test_every_v1_endpoint_needs_a_key(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, ops in paths.items():
        if not path.startswith("/v1"):
            continue
        concrete = path.replace("{", "").replace("}", "")
        for method in ops:
            r = client.request(method.upper(), concrete)
            assert r.status_code == 401, (method, path, r.status_code)


def test_wrong_key_is_401(client: TestClient, keys: Keys) -> None:
    r = client.get("/v1/me", headers=auth("sr_deadbeef_not-a-real-key"))
    assert r.status_code == 401
    assert "invalid" in r.json()["detail"]
    r = client.get("/v1/me", headers={"X-API-Key": keys.reviewer})
    assert r.status_code == 200 and r.json()["role"] == "reviewer"


def test_roles(client: TestClient, keys: Keys) -> None:
    r = client.post("/v1/keys", json={"name": "x", "role": "operator"}, headers=auth(keys.operator))
    assert r.status_code == 403
    assert "admin" in r.json()["detail"]
    r = client.get("/v1/jobs", headers=auth(keys.partner))
    assert r.status_code == 403
    r = client.post(
        "/v1/keys", json={"name": "new-op", "role": "operator"}, headers=auth(keys.admin)
    )
    assert r.status_code == 201
    new_key = r.json()["key"]
    assert client.get("/v1/jobs", headers=auth(new_key)).status_code == 200
    # Revoked keys stop working at once.
    key_id = r.json()["id"]
    assert client.delete(f"/v1/keys/{key_id}", headers=auth(keys.admin)).status_code == 200
    assert client.get("/v1/jobs", headers=auth(new_key)).status_code == 401


def test_unknown_ids_are_404(client: TestClient, keys: Keys) -> None:
    h = auth(keys.admin)
    assert client.get("/v1/jobs/nope", headers=h).status_code == 404
    assert client.get("/v1/batches/999", headers=h).status_code == 404
    assert client.get("/v1/exports/999", headers=h).status_code == 404
    assert client.get("/v1/datasets/nope", headers=h).status_code == 404
    assert client.get("/v1/models/nope/versions/1", headers=h).status_code == 404


def test_invalid_parameters_name_the_field(client: TestClient, keys: Keys) -> None:
    h = auth(keys.operator)
    r = client.post(
        "/v1/train", json={"dataset": "d", "model_name": "m", "batch_size": 0}, headers=h
    )
    assert r.status_code == 422
    fields = {e["field"] for e in r.json()["detail"]}
    assert "batch_size" in fields
    r = client.post("/v1/train", json={"dataset": "d", "model_name": "m"}, headers=h)
    assert r.status_code == 422
    assert "budget" in r.text
    r = client.post(
        "/v1/train", json={"dataset": "nope", "model_name": "m", "max_steps": 3}, headers=h
    )
    assert r.status_code == 422 and r.json()["field"] == "dataset"
    r = client.post("/v1/synthesize", json={"model": "nope", "per_class": 3}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "model"
    r = client.post("/v1/exports", json={"batch_id": 1, "partner": "partner-a"}, headers=h)
    assert r.status_code == 404
    r = client.post(
        "/v1/datasets", content=b"{not json", headers=h | {"content-type": "application/json"}
    )
    assert r.status_code == 422


def test_rate_limit_answers_429_per_client(settings: Settings, keys: Keys) -> None:
    app = create_app(settings.model_copy(update={"rate_limit": "3/minute"}))
    with TestClient(app, raise_server_exceptions=False, client=("10.0.0.1", 5000)) as c:
        for _ in range(3):
            assert c.get("/v1/me", headers=auth(keys.operator)).status_code == 200
        r = c.get("/v1/me", headers=auth(keys.operator))
        assert r.status_code == 429
        assert "3 per 1 minute" in r.json()["detail"]
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        # Another key from the same address shares the count: guessed keys get no allowance.
        assert c.get("/v1/me", headers=auth("sr_0000_guessed")).status_code == 429
        for _ in range(5):  # the probes are never limited
            assert c.get("/healthz").status_code == 200
    with TestClient(app, raise_server_exceptions=False, client=("10.0.0.2", 5000)) as other:
        assert other.get("/v1/me", headers=auth(keys.operator)).status_code == 200


def test_rate_limit_counts_in_redis_across_app_instances(settings: Settings, keys: Keys) -> None:
    """Two API processes sharing one Redis share the count (a fresh address per run, so
    counts left in Redis by earlier runs cannot interfere)."""
    shared = settings.model_copy(update={"rate_limit": "2/minute", "rate_limit_storage": REDIS_URL})
    address = f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}.{secrets.randbelow(250)}"
    one, two = create_app(shared), create_app(shared)
    with (
        TestClient(one, raise_server_exceptions=False, client=(address, 1)) as a,
        TestClient(two, raise_server_exceptions=False, client=(address, 2)) as b,
    ):
        assert a.get("/v1/me", headers=auth(keys.operator)).status_code == 200
        assert b.get("/v1/me", headers=auth(keys.operator)).status_code == 200
        assert a.get("/v1/me", headers=auth(keys.operator)).status_code == 429
        assert b.get("/v1/me", headers=auth(keys.operator)).status_code == 429


def test_rate_limit_store_down_serves_and_logs(
    settings: Settings, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    down = settings.model_copy(
        update={"rate_limit": "1/minute", "rate_limit_storage": "redis://127.0.0.1:1/0"}
    )
    with TestClient(create_app(down), raise_server_exceptions=False) as c:
        for _ in range(2):
            assert c.get("/v1/me", headers=auth(keys.operator)).status_code == 200
    assert "rate limit store unavailable" in caplog.text


def test_rate_limit_counts_each_key_across_addresses(settings: Settings, keys: Keys) -> None:
    """One key used from many addresses is limited by its own count; another key, and a
    request without one, are not."""
    app = create_app(
        settings.model_copy(update={"rate_limit": "", "rate_limit_per_key": "2/minute"})
    )
    for i in range(2):
        with TestClient(app, raise_server_exceptions=False, client=(f"10.1.0.{i}", 1)) as c:
            assert c.get("/v1/me", headers=auth(keys.operator)).status_code == 200
    with TestClient(app, raise_server_exceptions=False, client=("10.1.0.9", 1)) as c:
        r = c.get("/v1/me", headers={"X-API-Key": keys.operator})  # the same key, other header
        assert r.status_code == 429 and "2 per 1 minute" in r.json()["detail"]
        assert c.get("/v1/me", headers=auth(keys.reviewer)).status_code == 200
        assert c.get("/v1/datasets").status_code == 401
