"""A job's status as clients poll it: read by a Core statement (``jobs.service.read``), it
must show exactly what the ORM object shows, on both databases and through the API."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.testclient import TestClient
from support import Keys, auth

from synthray.app.db import session_scope
from synthray.app.jobs import service
from synthray.app.jobs.schemas import JobKind, JobRead, JobState
from synthray.config import Settings


def test_core_read_matches_the_orm_row(client: TestClient, keys: Keys, settings: Settings) -> None:
    started = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    with session_scope(settings.sqlalchemy_url) as s:
        job = service.create(
            s, settings, JobKind.export, {"folder": "/srv/secret", "split_seed": 7}, None
        )
        job.state = JobState.running
        job.progress_step, job.progress_total = 41, 300
        job.progress_message = "training: step 41 of 300"
        job.progress_detail = {"loss": 0.25, "classes": ["a", "b"], "nested": {"k": [1, 2]}}
        job.result = {"metrics": {"fid": 3.5}}
        job.attempts, job.started_at, job.heartbeat_at = 1, started, started
        job_id = job.id

    with session_scope(settings.sqlalchemy_url, read_only=True) as s:
        core = service.read(s, job_id)
        orm = JobRead.model_validate(service.get(s, job_id))
    assert core == orm
    assert core.progress.step == 41 and core.progress.detail["nested"] == {"k": [1, 2]}
    assert core.started_at == started and core.finished_at is None
    assert "folder" not in core.params and core.params["split_seed"] == 7

    r = client.get(f"/v1/jobs/{job_id}", headers=auth(keys.reviewer))
    assert r.status_code == 200
    assert r.json() == orm.model_dump(mode="json")

    missing = client.get(
        "/v1/jobs/00000000-0000-0000-0000-000000000000", headers=auth(keys.reviewer)
    )
    assert missing.status_code == 404
