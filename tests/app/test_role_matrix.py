"""Function-level authorization and inventory (OWASP API5 and API9, 2023), on both
databases: every /v1 operation of the OpenAPI document, called by every role and with no
key, answers as the README's role table says, and the table names every operation the
document has, no more and no fewer (an undocumented route fails this test).

Ids name nothing, so an allowed call gets 404 or 422, never 401 or 403; object-level
checks on real objects (another partner's export) are in test_app_pipeline."""

from __future__ import annotations

import importlib
import re

from fastapi.testclient import TestClient
from support import Keys, auth

STAFF = {"operator", "reviewer"}
ANY = {"operator", "reviewer", "partner"}

# Who may call each operation besides admin (who may call every one).
ROLES: dict[tuple[str, str], set[str]] = {
    ("GET", "/v1/me"): ANY,
    ("POST", "/v1/keys"): set(),
    ("GET", "/v1/keys"): set(),
    ("DELETE", "/v1/keys/{key_id}"): set(),
    ("POST", "/v1/datasets"): {"operator"},
    ("GET", "/v1/datasets"): STAFF,
    ("GET", "/v1/datasets/{name}"): STAFF,
    ("POST", "/v1/datasets/upload"): {"operator"},
    ("GET", "/v1/jobs"): STAFF,
    ("GET", "/v1/jobs/{job_id}"): STAFF,
    ("POST", "/v1/jobs/{job_id}/cancel"): {"operator"},
    ("POST", "/v1/jobs/{job_id}/retry"): {"operator"},
    ("GET", "/v1/jobs/{job_id}/preview.png"): STAFF,
    ("POST", "/v1/train"): {"operator"},
    ("GET", "/v1/models"): STAFF,
    ("GET", "/v1/models/{name}"): STAFF,
    ("GET", "/v1/models/{name}/versions/{version}"): STAFF,
    ("PUT", "/v1/models/{name}/aliases/{alias}"): {"reviewer"},
    ("GET", "/v1/models/{name}/aliases/history"): STAFF,
    ("POST", "/v1/models/{name}/versions/{version}/archive"): {"operator"},
    ("GET", "/v1/models/{name}/compare"): STAFF,
    ("GET", "/v1/models/{name}/versions/{version}/gallery.png"): STAFF,
    ("GET", "/v1/models/{name}/versions/{version}/weights"): set(),
    ("POST", "/v1/synthesize"): {"operator"},
    ("GET", "/v1/batches"): STAFF,
    ("GET", "/v1/batches/{batch_id}"): STAFF,
    ("GET", "/v1/batches/{batch_id}/report"): STAFF,
    ("GET", "/v1/batches/{batch_id}/report.html"): STAFF,
    ("POST", "/v1/exports"): {"operator"},
    ("GET", "/v1/exports"): ANY,
    ("GET", "/v1/exports/{export_id}"): ANY,
    ("POST", "/v1/exports/{export_id}/approve"): {"reviewer"},
    ("POST", "/v1/exports/{export_id}/reject"): {"reviewer"},
    # Every role may ask; for a missing export each gets the same 404 (the role check
    # comes after the lookup, so it tells nobody which exports exist).
    ("GET", "/v1/exports/{export_id}/download"): ANY,
    ("POST", "/v1/image-checks"): {"operator"},
    ("GET", "/v1/image-checks/{check_id}"): STAFF,
    ("GET", "/v1/image-checks/{check_id}/report"): STAFF,
    ("GET", "/v1/image-checks/{check_id}/report.html"): STAFF,
    ("POST", "/v1/evaluations"): {"operator"},
    ("GET", "/v1/evaluations"): STAFF,
    ("GET", "/v1/evaluations/{evaluation_id}"): STAFF,
    ("GET", "/v1/evaluations/{evaluation_id}/result"): STAFF,
    ("GET", "/v1/evaluations/{evaluation_id}/result.csv"): STAFF,
    ("GET", "/v1/evaluations/{evaluation_id}/chart.png"): STAFF,
    ("GET", "/v1/audit"): {"reviewer"},
}
PLACEHOLDERS = {"name": "nope", "alias": "candidate", "job_id": "nope"}
QUERY = {
    "/v1/models/{name}/compare": {"a": 1, "b": 2},
    "/v1/evaluations": {"model": "m", "version": 1},
}

V1_ROUTERS = (
    "auth",
    "datasets",
    "jobs",
    "registry",
    "batches",
    "exports",
    "imagechecks",
    "evaluations",
    "audit",
)
TOP_LEVEL = (
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
)


def _operations(client: TestClient) -> set[tuple[str, str]]:
    paths = client.get("/openapi.json").json()["paths"]
    return {(m.upper(), p) for p, ops in paths.items() if p.startswith("/v1") for m in ops}


def test_the_table_names_every_operation_and_no_other(client: TestClient) -> None:
    assert _operations(client) == set(ROLES)
    # Every route the routers serve is in the document (none hidden from it).
    served = {
        (method, "/v1" + route.path)
        for module in V1_ROUTERS
        for route in importlib.import_module(f"synthray.app.{module}.router").router.routes
        for method in getattr(route, "methods", ())
    }
    assert served == set(ROLES)
    # Outside /v1: the probes, and the document and its viewers (dev mode here).
    top = {(m, r.path) for r in client.app.routes for m in getattr(r, "methods", None) or ()}
    assert {(m, p) for m, p in top if m != "HEAD"} == {("GET", p) for p in TOP_LEVEL}


def test_every_role_gets_what_the_table_says(client: TestClient, keys: Keys) -> None:
    by_role = {
        "admin": keys.admin,
        "operator": keys.operator,
        "reviewer": keys.reviewer,
        "partner": keys.partner,
    }
    wrong: list[str] = []
    for method, path in sorted(ROLES):
        url = re.sub(r"\{(\w+)\}", lambda m: PLACEHOLDERS.get(m.group(1), "999999"), path)
        kwargs = {"params": QUERY.get(path, {})}
        if method in ("POST", "PUT"):
            kwargs["json"] = {}
        r = client.request(method, url, **kwargs)
        if r.status_code != 401:
            wrong.append(f"{method} {path} without a key: {r.status_code}")
        for role, key in by_role.items():
            r = client.request(method, url, headers=auth(key), **kwargs)
            allowed = role == "admin" or role in ROLES[(method, path)]
            if allowed and r.status_code in (401, 403):
                wrong.append(f"{method} {path} as {role}: {r.status_code}, expected access")
            if not allowed and r.status_code != 403:
                wrong.append(f"{method} {path} as {role}: {r.status_code}, expected 403")
    assert not wrong, "\n".join(wrong)
