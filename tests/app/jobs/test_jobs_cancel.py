"""Cancelling: a queued job at once; a running training job at its next heartbeat, with
its last checkpoint kept (for job_files_retention_days)."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

from conftest import World
from fastapi.testclient import TestClient
from sqlalchemy import update
from support import Keys, auth, cancel_mid_training

from synthray.app.db import session_scope
from synthray.app.jobs.service import prune_job_files
from synthray.app.jobs.tables import Job
from synthray.config import Settings
from synthray.workers.runner import run


def test_cancel_queued_and_running(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    op = auth(keys.operator)
    body = {
        "dataset": "nih",
        "model_name": "cancelled",
        "max_seconds": 120,
        "batch_size": 4,
        "checkpoint_every_s": 1,
        "evaluate": False,
    }

    # Queued: cancelled at once, and a later delivery does nothing.
    job_id = client.post("/v1/train", json=body, headers=op).json()["job_id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=op)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert run(job_id, settings) == "skipped"
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=op).status_code == 409

    # Running: the worker sees the request at its next heartbeat and stops.
    job_id, ckpt = cancel_mid_training(client, settings, keys.operator, body)
    job = client.get(f"/v1/jobs/{job_id}", headers=op).json()
    assert job["state"] == "cancelled" and job["cancel_requested"] is True
    assert ckpt.exists()  # the last checkpoint is kept
    models = client.get("/v1/models", headers=op).json()
    assert [m["name"] for m in models] == ["m"]  # the world's; nothing new registered

    # Retention: the kept checkpoint goes once the job ended job_files_retention_days ago;
    # a queued job's folder stays however old, and a folder with no job goes when old.
    root = settings.work_dir / "jobs"
    queued_id = client.post("/v1/train", json=body, headers=op).json()["job_id"]
    (root / queued_id).mkdir()
    old, fresh = root / "no-such-job-old", root / "no-such-job-fresh"
    old.mkdir()
    fresh.mkdir()
    ten_days_ago = time.time() - 10 * 86400
    for path in (old, root / queued_id):
        os.utime(path, (ten_days_ago, ten_days_ago))
    with session_scope(settings.sqlalchemy_url) as s:
        assert prune_job_files(s, settings) == ["no-such-job-old"]  # the job ended just now
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(finished_at=datetime.now(UTC) - timedelta(days=8))
        )
    with session_scope(settings.sqlalchemy_url) as s:
        assert prune_job_files(s, settings) == [job_id]
    assert not ckpt.parent.exists()
    assert (root / queued_id).is_dir() and fresh.is_dir()
