"""What hospital IT watches: JSON logs that follow a request into its job, and Prometheus
metrics about requests and work, read from the real app and a real job run."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_settings
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from support import NIH_INGEST, Keys, auth, copy_subset, make_keys, run_queued

from synthray import logs
from synthray.app.db import session_scope
from synthray.app.jobs.tables import Job
from synthray.app.main import create_app
from synthray.config import Settings


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The root logger also writes our JSON lines into a buffer for the test's duration."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextIds())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _entries(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_request_id_follows_the_request_into_its_job(
    client: TestClient, keys: Keys, settings: Settings, json_lines: io.StringIO
) -> None:
    copy_subset(settings.import_root, per_class=2)
    body = {"name": "traced", "source": "nih"} | NIH_INGEST
    headers = auth(keys.operator) | {"X-Request-ID": "ticket-4711.a"}
    r = client.post("/v1/datasets", json=body, headers=headers)
    assert r.status_code == 202, r.text
    assert r.headers["x-request-id"] == "ticket-4711.a"
    job_id = r.json()["job_id"]
    assert run_queued(settings) == ["succeeded"]

    entries = _entries(json_lines)
    access = [e for e in entries if e["logger"] == "synthray.access"]
    post = [e for e in access if e.get("route") == "/v1/datasets" and e["status"] == 202]
    assert post and post[0]["request_id"] == "ticket-4711.a"
    # The worker's lines carry the job id and the id of the request that created it.
    worker = [e for e in entries if e.get("job_id") == job_id]
    assert any("started" in str(e["msg"]) for e in worker), worker
    assert worker and all(e.get("request_id") == "ticket-4711.a" for e in worker)
    # Every line is one JSON object with a timestamp and a level.
    assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in entries)


def test_an_unsafe_request_id_is_replaced(client: TestClient, json_lines: io.StringIO) -> None:
    for hostile in (b'x"}{"level": "CRITICAL', b"a" * 65, "naïve".encode("latin-1"), b""):
        r = client.get("/healthz", headers={"X-Request-ID": hostile})  # type: ignore[dict-item]
        fresh = r.headers["x-request-id"]
        assert fresh.encode() != hostile and len(fresh) == 32 and fresh.isalnum()
    # The access line names the route template, not the path the client typed.
    client.get("/v1/jobs/some-job-name", headers={"X-API-Key": "sr_nope"})
    routes = {e.get("route") for e in _entries(json_lines) if e["logger"] == "synthray.access"}
    assert "/v1/jobs/{job_id}" in routes and not any("some-job-name" in str(r) for r in routes)


def test_exceptions_are_logged_by_type_and_frames_never_by_message() -> None:
    message = "PatientName=" + "^".join(["DOE", "JANE"])  # known only at run time
    try:
        raise ValueError(message)
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", None, None)
        import sys

        record.exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(record)
    text = logs.TextFormatter()
    record.request_id = record.job_id = None
    assert "DOE" not in line and "DOE" not in text.format(record)
    assert json.loads(line)["exc_type"] == "ValueError"
    assert "test_exceptions_are_logged" in json.loads(line)["exc_frames"]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_and_read_work_from_the_database(
    client: TestClient, keys: Keys, settings: Settings
) -> None:
    copy_subset(settings.import_root, per_class=2)
    body = {"name": "metered", "source": "nih"} | NIH_INGEST
    assert client.post("/v1/datasets", json=body, headers=auth(keys.operator)).status_code == 202
    before = _samples(client.get("/metrics").text)
    assert before[("synthray_queue_depth", (("queue", "cpu"),))] == 1
    assert before[("synthray_jobs", (("kind", "ingest"), ("state", "queued")))] == 1
    assert run_queued(settings) == ["succeeded"]
    for _ in range(3):
        assert client.get("/v1/jobs/nope", headers=auth(keys.operator)).status_code == 404
    client.get("/v1/exports/12/download")  # no key: refused, and audited

    import time

    time.sleep(5.1)  # past the scrape cache
    text = client.get("/metrics").text
    m = _samples(text)
    key = (
        "synthray_http_requests_total",
        (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404")),
    )
    assert m[key] == 3
    assert m[("synthray_jobs", (("kind", "ingest"), ("state", "succeeded")))] == 1
    ingest_ok = (("kind", "ingest"), ("state", "succeeded"))
    assert m[("synthray_job_duration_seconds_count", ingest_ok)] == 1
    # The database's own sum agrees with the job's recorded start and end.
    with session_scope(settings.sqlalchemy_url) as s:
        job = s.scalars(select(Job).where(Job.kind == "ingest")).one()
        assert job.started_at is not None and job.finished_at is not None
        took = (job.finished_at - job.started_at).total_seconds()
    assert took > 0
    assert m[("synthray_job_duration_seconds_sum", ingest_ok)] == pytest.approx(took, abs=2e-3)
    assert ("synthray_queue_depth", (("queue", "cpu"),)) not in m
    assert m[("synthray_export_downloads", (("outcome", "refused"),))] == 1
    assert m[("synthray_gate_flagged_images", ())] == 0
    assert any(k[0] == "synthray_http_request_duration_seconds_bucket" for k in m)


def test_metrics_need_the_token_outside_dev_mode(tmp_path: Path, database_url: str) -> None:
    secret = "s" * 40
    closed = make_settings(tmp_path / "a", database_url, dev_mode=False, secret_key=secret)
    make_keys(closed)
    with TestClient(create_app(closed), raise_server_exceptions=False) as c:
        assert c.get("/metrics").status_code == 404
    guarded = make_settings(
        tmp_path / "b", database_url, dev_mode=False, secret_key=secret, metrics_token="scrape-1"
    )
    with TestClient(create_app(guarded), raise_server_exceptions=False) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer scrape-2"}).status_code == 401
        ok = c.get("/metrics", headers={"Authorization": "Bearer scrape-1"})
        assert ok.status_code == 200 and "synthray_jobs" in ok.text
