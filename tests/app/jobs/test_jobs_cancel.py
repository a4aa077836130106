"""Cancelling: a queued job at once; a running training job at its next heartbeat, with
its last checkpoint kept (for job_files_retention_days); a running job whose worker was
lost when the sweeper finds its lease over. A job lost too often ends with its object."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

from conftest import World
from fastapi.testclient import TestClient
from sqlalchemy import update
from support import Keys, auth, cancel_mid_training

from synthray.app.db import session_scope
from synthray.app.jobs.repository import claim
from synthray.app.jobs.service import prune_job_files
from synthray.app.jobs.tables import Job
from synthray.config import Settings
from synthray.workers.runner import run
from synthray.workers.sweeper import sweep_once


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


def _held_by_a_lost_worker(settings: Settings, job_id: str, attempts: int) -> None:
    """Claim ``job_id`` as a worker would, then let that worker vanish: its lease is
    already over, and it has been claimed ``attempts`` times."""
    with session_scope(settings.sqlalchemy_url) as s:
        assert claim(s, job_id, "lost-host:1:1", datetime.now(UTC), timedelta(seconds=60))
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(attempts=attempts, lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def _synthesis(client: TestClient, key: str) -> tuple[int, str]:
    r = client.post(
        "/v1/synthesize", json={"model": "m", "version": 1, "per_class": 2}, headers=auth(key)
    )
    assert r.status_code == 202, r.text
    return r.json()["batch_id"], r.json()["job_id"]


def test_a_job_whose_worker_was_lost_ends_with_its_batch(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    """Cancelled while its worker was lost: the sweeper ends it (not back to a queue no
    worker may take it from) and its batch with it. Lost too often, or claimed once too
    often by a late delivery: failed, and so is its batch, not left 'generating'."""
    op = auth(keys.operator)

    def states(batch_id: int, job_id: str) -> tuple[str, str]:
        batch = client.get(f"/v1/batches/{batch_id}", headers=op).json()
        return batch["state"], client.get(f"/v1/jobs/{job_id}", headers=op).json()["state"]

    batch_id, job_id = _synthesis(client, keys.operator)
    _held_by_a_lost_worker(settings, job_id, attempts=1)
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=op)
    assert r.status_code == 200 and r.json()["state"] == "running"
    assert states(batch_id, job_id) == ("generating", "running")
    sweep_once(settings)
    assert states(batch_id, job_id) == ("cancelled", "cancelled")
    job = client.get(f"/v1/jobs/{job_id}", headers=op).json()
    assert "stopped responding" in job["progress"]["message"]
    assert run(job_id, settings) == "skipped"  # a late delivery does nothing
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=op).status_code == 200
    assert run(job_id, settings) == "succeeded"  # the batch came back with its job
    assert states(batch_id, job_id)[1] == "succeeded"

    batch_id, job_id = _synthesis(client, keys.operator)
    _held_by_a_lost_worker(settings, job_id, attempts=settings.job_max_attempts)
    sweep_once(settings)
    assert states(batch_id, job_id) == ("failed", "failed")
    job = client.get(f"/v1/jobs/{job_id}", headers=op).json()
    assert job["error"] == f"the worker running this job was lost {settings.job_max_attempts} times"

    batch_id, job_id = _synthesis(client, keys.operator)
    _held_by_a_lost_worker(settings, job_id, attempts=settings.job_max_attempts)
    assert run(job_id, settings) == "gave-up"  # delivered before the sweeper looked
    assert states(batch_id, job_id) == ("failed", "failed")

    # A lease still running is left alone, cancelled or not.
    batch_id, job_id = _synthesis(client, keys.operator)
    with session_scope(settings.sqlalchemy_url) as s:
        assert claim(s, job_id, "busy-host:1:1", datetime.now(UTC), timedelta(seconds=60))
    client.post(f"/v1/jobs/{job_id}/cancel", headers=op)
    sweep_once(settings)
    assert states(batch_id, job_id) == ("generating", "running")

    # A queued row with a cancel request (what the sweeper used to leave: no claim takes
    # it, so it was re-published for ever) is ended with its batch.
    batch_id, job_id = _synthesis(client, keys.operator)
    with session_scope(settings.sqlalchemy_url) as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(cancel_requested=True, enqueued_at=None)
        )
    assert sweep_once(settings) == 0
    assert states(batch_id, job_id) == ("cancelled", "cancelled")
