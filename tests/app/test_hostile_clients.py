"""Hostile clients and failing infrastructure, on both databases: every input is bounded
in the OpenAPI document, out-of-range and NUL values are refused with 4xx, bodies are
capped before they are read, a database outage is 503 and a full disk 507, concurrent
requests never collide on version numbers, and refusals are audited."""

from __future__ import annotations

import errno
import io
import json
import logging
import re
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from fastapi.testclient import TestClient
from support import NIH_INGEST, Keys, auth, copy_subset, make_keys

from synthray.app.errors import describe_unexpected
from synthray.app.fields import INT32_MAX
from synthray.app.main import create_app
from synthray.config import Settings

# ------------------------------------------------------------------ the document


def unbounded_inputs(doc: dict[str, Any]) -> list[str]:
    """Every parameter or request-body value the document leaves unbounded: an integer
    past int32, a number without a maximum, a string without maxLength (or enum), an array
    without maxItems, a map without maxProperties."""
    comps = doc.get("components", {}).get("schemas", {})
    found: list[str] = []

    def walk(s: dict[str, Any], where: str, seen: frozenset[str]) -> None:
        if "$ref" in s:
            name = s["$ref"].rsplit("/", 1)[-1]
            if name in seen:
                return
            seen, s = seen | {name}, comps[name]
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in s.get(key, []):
                walk(sub, where, seen)
        t = s.get("type")
        fixed = "enum" in s or "const" in s
        if t == "integer" and not fixed:
            hi = s.get("maximum", s.get("exclusiveMaximum", float("inf")))
            lo = s.get("minimum", s.get("exclusiveMinimum", float("-inf")))
            if hi > INT32_MAX or lo < -INT32_MAX - 1:
                found.append(f"{where}: integer beyond int32")
        if t == "number" and "maximum" not in s and "exclusiveMaximum" not in s:
            found.append(f"{where}: number without maximum")
        if t == "string" and not fixed and "maxLength" not in s and s.get("format") != "binary":
            found.append(f"{where}: string without maxLength")
        if t == "array":
            if "maxItems" not in s:
                found.append(f"{where}: array without maxItems")
            walk(s.get("items", {}), where + "[]", seen)
        if t == "object":
            extra = s.get("additionalProperties")
            if isinstance(extra, dict):
                if "maxProperties" not in s:
                    found.append(f"{where}: map without maxProperties")
                walk(extra, where + "{}", seen)
                walk(s.get("propertyNames", {"type": "string"}), where + "{key}", seen)
            for k, v in s.get("properties", {}).items():
                walk(v, f"{where}.{k}", seen)

    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for p in op.get("parameters", []):
                walk(p["schema"], f"{method.upper()} {path} {p['in']} {p['name']}", frozenset())
            for content in op.get("requestBody", {}).get("content", {}).values():
                walk(content["schema"], f"{method.upper()} {path} body", frozenset())
    return found


def test_the_walker_finds_unbounded_inputs() -> None:
    """The check below can fail: an unbounded document is reported field by field."""
    doc = {
        "paths": {
            "/x/{id}": {
                "post": {
                    "parameters": [{"in": "path", "name": "id", "schema": {"type": "integer"}}],
                    "requestBody": {
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "s": {"type": "string"},
                                        "m": {
                                            "type": "object",
                                            "additionalProperties": {"type": "integer"},
                                        },
                                    },
                                }
                            }
                        }
                    },
                }
            }
        }
    }
    assert len(unbounded_inputs(doc)) == 5  # id, s, the map, its values, its keys


def test_every_client_input_is_bounded(client: TestClient) -> None:
    assert unbounded_inputs(client.get("/openapi.json").json()) == []


def test_every_operation_documents_its_errors(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for path, ops in doc["paths"].items():
        if not path.startswith("/v1"):
            continue
        for method, op in ops.items():
            codes = set(op["responses"])
            assert {"401", "403", "404", "413", "422", "503"} <= codes, (method, path)
            schema = op["responses"]["422"]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/ErrorBody"), (method, path)


# ------------------------------------------------------------------ bad values

BAD_IDS = ["0", "-1", str(INT32_MAX + 1), str(2**63), "99999999999999999999", "1.5", "%00"]


def _v1_operations(client: TestClient) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in client.get("/openapi.json").json()["paths"].items():
        if path.startswith("/v1"):
            for method, op in ops.items():
                yield method, path, op


def test_out_of_range_ids_are_4xx_never_500(client: TestClient, keys: Keys) -> None:
    """Every path and query parameter, on every operation, with values no column holds."""
    h = auth(keys.admin)
    tried = 0
    for method, path, op in _v1_operations(client):
        params = [p for p in op.get("parameters", []) if p["in"] in ("path", "query")]
        for p in params:
            for bad in BAD_IDS:
                values = {q["name"]: "1" for q in params if q["in"] == "path"}
                if p["schema"].get("type") == "string" or "pattern" in p["schema"]:
                    values = {q["name"]: "nope" for q in params if q["in"] == "path"}
                query = {}
                if p["in"] == "path":
                    values[p["name"]] = bad
                else:
                    query[p["name"]] = bad.replace("%00", "\x00")
                url = re.sub(r"\{(\w+)\}", lambda m, v=values: v[m.group(1)], path)
                body = {} if method in ("post", "put") else None
                r = client.request(method.upper(), url, params=query, json=body, headers=h)
                assert r.status_code in (400, 404, 405, 409, 422), (method, url, r.status_code)
                assert r.headers["content-type"] == "application/json", (method, url)
                tried += 1
    assert tried > 100


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/datasets", {"name": "d", "classes": ["a", "b"], "split_seed": 2**63}),
        ("/v1/datasets", {"name": "d", "classes": ["a", "b"], "source": "a\x00b"}),
        ("/v1/datasets", {"name": "d", "classes": ["a", "b"], "label_map": {"a\x00": "a"}}),
        ("/v1/datasets", {"name": "d", "classes": ["a" * 101, "b"]}),
        ("/v1/datasets", {"name": "d", "classes": [str(i) for i in range(65)]}),
        ("/v1/train", {"dataset": "d", "model_name": "m", "dataset_version": 2**31}),
        ("/v1/train", {"dataset": "d\x00", "model_name": "m", "max_steps": 5}),
        ("/v1/synthesize", {"model": "m", "version": 10**20, "per_class": 1}),
        ("/v1/synthesize", {"model": "m", "counts": {str(i): 1 for i in range(65)}}),
        ("/v1/synthesize", {"model": "m", "counts": {"a": 100_001}}),
        ("/v1/exports", {"batch_id": 2**63, "partner": "p"}),
        ("/v1/evaluations", {"model": "m", "version": -1}),
        ("/v1/keys", {"name": "k\x00", "role": "admin"}),
    ],
)
def test_out_of_range_body_fields_are_422(
    client: TestClient, keys: Keys, route: str, body: dict[str, Any]
) -> None:
    r = client.post(route, json=body, headers=auth(keys.admin))
    assert r.status_code == 422, r.text
    assert "\x00" not in r.text and "99999" not in r.text  # never the value itself


def mistyped_values(schema: dict[str, Any], comps: dict[str, Any]) -> list[Any]:
    """JSON values of the wrong type for a body field, by its schema: text and a boolean
    for a number, text and a number for a boolean, and the same one level down in a map's
    values and an array's items. Each is what pydantic's lax mode would have taken ("5",
    true, "0", 1)."""
    if "$ref" in schema:
        schema = comps[schema["$ref"].rsplit("/", 1)[-1]]
    out: list[Any] = []
    for sub in schema.get("anyOf", []):
        out += mistyped_values(sub, comps)
    t = schema.get("type")
    if t in ("integer", "number"):
        out += ["1", True]
    elif t == "boolean":
        out += ["true", 1]
    elif t == "object" and isinstance(schema.get("additionalProperties"), dict):
        out += [{"a": v} for v in mistyped_values(schema["additionalProperties"], comps)]
    elif t == "array":
        items = schema.get("prefixItems") or [schema.get("items", {})]
        out += [[v] * len(items) for v in mistyped_values(items[0], comps)]
    return out


def test_body_numbers_and_booleans_take_json_types_only(client: TestClient, keys: Keys) -> None:
    """Every number and boolean field of every JSON request body, found in the OpenAPI
    document, refuses text and the other scalar type with a 422 that names it: the document
    says integer, number or boolean, and lax validation would take "5" or true for a
    number and "0" or 1 for a boolean (the schema fuzzer found the boolean case)."""
    doc = client.get("/openapi.json").json()
    comps = doc["components"]["schemas"]
    tried: list[str] = []
    for path, ops in doc["paths"].items():
        if "{" in path:
            continue
        for method, op in ops.items():
            schema = op.get("requestBody", {}).get("content", {}).get("application/json")
            if schema is None:
                continue
            body = schema["schema"]
            body = comps[body["$ref"].rsplit("/", 1)[-1]] if "$ref" in body else body
            for name, field in body.get("properties", {}).items():
                for value in mistyped_values(field, comps):
                    r = client.request(method, path, json={name: value}, headers=auth(keys.admin))
                    assert r.status_code == 422, (path, name, value, r.text)
                    named = [e["field"] for e in r.json()["detail"]]
                    assert any(f == name or f.startswith(name + ".") for f in named), (
                        path,
                        name,
                        value,
                        named,
                    )
                    tried.append(f"{method} {path} {name}")
    # Every body with numbers or booleans was reached (the walk can fail to find them).
    assert {"post /v1/train max_seconds", "post /v1/synthesize counts"} <= set(tried)
    assert {"post /v1/keys same_partner", "post /v1/datasets holdout_fraction"} <= set(tried)
    assert len(set(tried)) >= 25


# ------------------------------------------------------------------ bodies


def test_bodies_are_capped_before_they_are_read(
    client: TestClient, keys: Keys, settings: Settings
) -> None:
    limit = settings.max_json_bytes
    big = b'{"name": "' + b"x" * limit + b'"}'
    json_type = {"content-type": "application/json"}
    # Declared too large: refused before a byte is read, with or without a key.
    for headers in ({}, auth("sr_guessed_key"), auth(keys.admin)):
        r = client.post("/v1/datasets", content=big, headers=json_type | headers)
        assert r.status_code == 413, r.text
        assert r.json()["detail"] == f"the request body is larger than {limit} bytes"
    # Undeclared (chunked): counted as it arrives and cut off at the limit.
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(4 * limit // 65536):
            sent += 65536
            yield b" " * 65536

    r = client.post("/v1/train", content=chunks(), headers=json_type | auth(keys.admin))
    assert r.status_code == 413, r.text
    # Below the limit, the same routes answer as usual.
    r = client.post("/v1/datasets", content=b"{}", headers=json_type | auth(keys.admin))
    assert r.status_code == 422
    assert client.get("/healthz").status_code == 200


# ------------------------------------------------------------------ infrastructure


def test_database_outage_is_503_with_retry_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens on port 1: every request that needs the database gets 503 with
    Retry-After, /readyz says so, and the log names the error's type, not its message
    (which carries the server's address)."""
    s = make_settings(tmp_path, "postgresql+psycopg://synthray@127.0.0.1:1/none")
    with (
        caplog.at_level(logging.ERROR),
        TestClient(create_app(s), raise_server_exceptions=False) as c,
    ):
        r = c.get("/v1/me", headers=auth("sr_x_y"))
        assert r.status_code == 503, r.text
        assert r.json() == {"detail": "the database is unavailable; retry shortly"}
        assert int(r.headers["retry-after"]) > 0
        r = c.post("/v1/train", json={"dataset": "d", "model_name": "m", "max_steps": 5})
        assert r.status_code == 503
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["database"] == "unavailable (OperationalError)"
    assert "OperationalError" in caplog.text
    assert "127.0.0.1" not in caplog.text and "connection refused" not in caplog.text.lower()


def test_readyz_reports_storage_that_cannot_take_writes(
    client: TestClient, settings: Settings
) -> None:
    assert client.get("/readyz").json()["storage"] == "ok"
    settings.min_free_bytes = 2**62  # more than any disk holds
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["storage"].startswith("unavailable (only")


def test_infrastructure_errors_have_fixed_answers() -> None:
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # full disk, quota, size limit
        assert describe_unexpected(OSError(code, "No space left on /secret/path"))[:2] == (
            507,
            "the server's storage is full; ask the operator to free space",
        )
    assert describe_unexpected(KeyError("x"))[:2] == (500, "internal error")


def test_relative_data_dir_is_resolved(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SYNTHRAY_DATA_DIR=var (the default) works like an absolute folder: a zip upload with
    a labels CSV, whose path is compared with the upload folder's, is accepted."""
    monkeypatch.chdir(tmp_path)
    s = make_settings(Path("rel"), database_url)
    assert s.data_dir.is_absolute() and s.data_dir == tmp_path / "rel" / "data"
    folder = copy_subset(tmp_path / "src", per_class=3)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in folder.rglob("*"):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    keys = make_keys(s)
    spec = json.dumps({"name": "up"} | NIH_INGEST)
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        r = c.post(
            "/v1/datasets/upload",
            files={"file": ("u.zip", buf.getvalue(), "application/zip")},
            data={"spec": spec},
            headers=auth(keys.operator),
        )
    assert r.status_code == 202, r.text


# ------------------------------------------------------------------ races


def test_concurrent_versions_get_distinct_numbers(
    client: TestClient, keys: Keys, settings: Settings
) -> None:
    """Ten requests at once for one new dataset name, then five more: every one is
    accepted, with version numbers 1..15 and no collision (PostgreSQL runs them in
    parallel; SQLite serializes writers)."""
    copy_subset(settings.import_root, per_class=3)
    body = {"name": "race", "source": "nih"} | NIH_INGEST

    def post(_: int) -> tuple[int, int | None]:
        r = client.post("/v1/datasets", json=body, headers=auth(keys.operator))
        return r.status_code, r.json().get("version")

    with ThreadPoolExecutor(10) as pool:
        first = list(pool.map(post, range(10)))
        more = list(pool.map(post, range(5)))
    assert [code for code, _ in first + more] == [202] * 15, first + more
    assert sorted(v for _, v in first) == list(range(1, 11))
    assert sorted(v for _, v in more) == list(range(11, 16))


# ------------------------------------------------------------------ keys and audit


def test_the_last_admin_key_cannot_be_revoked(client: TestClient, keys: Keys) -> None:
    me = client.get("/v1/me", headers=auth(keys.admin)).json()
    r = client.delete(f"/v1/keys/{me['key_id']}", headers=auth(keys.admin))
    assert r.status_code == 409 and "last active admin" in r.json()["detail"]
    second = client.post(
        "/v1/keys", json={"name": "admin-2", "role": "admin"}, headers=auth(keys.admin)
    ).json()
    assert client.delete(f"/v1/keys/{me['key_id']}", headers=auth(second["key"])).status_code == 200
    r = client.delete(f"/v1/keys/{second['id']}", headers=auth(second["key"]))
    assert r.status_code == 409


def test_refused_requests_are_audited(client: TestClient, keys: Keys) -> None:
    assert client.get("/v1/jobs", headers=auth(keys.partner)).status_code == 403
    assert client.get("/v1/datasets").status_code == 401
    assert client.post("/v1/keys", json={"name": "x", "role": "admin"}).status_code == 401
    events = client.get("/v1/audit", headers=auth(keys.admin)).json()
    refused = {
        (e["object_id"], e["actor_name"], e["detail"]["reason"])
        for e in events
        if e["action"] == "request" and e["outcome"] == "refused"
    }
    assert ("GET /v1/jobs", "partner-a", "role partner lacks the right") in refused
    assert ("GET /v1/datasets", None, "no valid API key") in refused
    assert ("POST /v1/keys", None, "no valid API key") in refused


def test_job_answers_name_no_server_path(
    client: TestClient, keys: Keys, settings: Settings
) -> None:
    copy_subset(settings.import_root, per_class=3)
    r = client.post(
        "/v1/datasets",
        json={"name": "d", "source": "nih"} | NIH_INGEST,
        headers=auth(keys.operator),
    )
    job = client.get(f"/v1/jobs/{r.json()['job_id']}", headers=auth(keys.operator))
    assert job.json()["params"]["source"] == "nih"
    assert str(settings.import_root) not in job.text and str(settings.data_dir) not in job.text


def test_production_mode_publishes_no_api_map(tmp_path: Path, database_url: str) -> None:
    """Outside dev mode /docs and the OpenAPI document are off unless asked for; no CORS
    header is ever sent (the API serves no browser origin but its own)."""
    prod = make_settings(tmp_path, database_url, dev_mode=False, secret_key="k" * 40)
    with TestClient(create_app(prod), raise_server_exceptions=False) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 404, path
        r = c.get("/healthz", headers={"Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in r.headers
    opened = prod.model_copy(update={"api_docs": True})
    with TestClient(create_app(opened), raise_server_exceptions=False) as c:
        assert c.get("/openapi.json").status_code == 200
