"""Retrying a failed or cancelled job under its own id, on both databases: a cancelled
training run resumes and ends at its asked step count; a synthesis cancelled before it
started takes its batch with it and brings it back on retry; a retry is refused (409, with
the reason) while the job is live, once its object has moved on, and when its uploads are
gone; every retry is audited. Cancelling a queued upload deletes the uploaded files."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from conftest import World
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from support import SHARED_DATA, Keys, auth, cancel_mid_training, run_queued, upload_spec

from synthray.app.db import session_scope
from synthray.app.jobs.tables import Job
from synthray.config import Settings
from synthray.models.checkpoint import load_state
from synthray.workers.runner import run


def _retry(client: TestClient, key: str, job_id: str) -> tuple[int, dict]:
    r = client.post(f"/v1/jobs/{job_id}/retry", headers=auth(key))
    return r.status_code, r.json()


def test_a_cancelled_training_run_resumes_on_retry(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    op = auth(keys.operator)
    steps = 60
    body = {
        "dataset": "nih",
        "model_name": "again",
        "max_steps": steps,
        "batch_size": 4,
        "checkpoint_every_s": 1,
        "evaluate": False,
    }
    job_id, ckpt = cancel_mid_training(client, settings, keys.operator, body)
    _, meta = load_state(ckpt)
    assert 0 < meta["step"] < steps, "the run must stop mid-training"

    assert _retry(client, keys.reviewer, job_id)[0] == 403
    status, job = _retry(client, keys.operator, job_id)
    assert status == 200, job
    assert job["state"] == "queued" and job["attempts"] == 0 and job["error"] is None
    assert job["cancel_requested"] is False
    assert job["progress"]["message"] == "queued again by an operator"
    status, body409 = _retry(client, keys.operator, job_id)  # queued: nothing to retry
    assert status == 409 and "queued" in body409["detail"]

    assert run(job_id, settings) == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}", headers=op).json()
    assert job["attempts"] == 1 and job["result"]["metrics"]["steps"] == steps
    versions = client.get("/v1/models/again", headers=op).json()["versions"]
    assert len(versions) == 1
    status, body409 = _retry(client, keys.operator, job_id)
    assert status == 409 and "succeeded" in body409["detail"]

    events = client.get("/v1/audit", headers=auth(keys.reviewer)).json()
    retries = [e for e in events if e["action"] == "retry_job"]
    assert [(e["object_id"], e["detail"]["kind"]) for e in retries] == [(job_id, "train")]


def test_synthesis_and_check_retried_with_their_batch(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    op = auth(keys.operator)
    r = client.post(
        "/v1/synthesize",
        json={"model": "m", "version": 1, "per_class": 4},
        headers=op,
    )
    assert r.status_code == 202, r.text
    batch_id, synth_id = r.json()["batch_id"], r.json()["job_id"]

    # Cancelled before it started: the batch is cancelled with it, not left generating.
    assert client.post(f"/v1/jobs/{synth_id}/cancel", headers=op).status_code == 200
    assert client.get(f"/v1/batches/{batch_id}", headers=op).json()["state"] == "cancelled"
    assert run(synth_id, settings) == "skipped"

    status, job = _retry(client, keys.operator, synth_id)
    assert status == 200 and job["state"] == "queued", job
    assert client.get(f"/v1/batches/{batch_id}", headers=op).json()["state"] == "generating"
    assert run(synth_id, settings) == "succeeded"
    batch = client.get(f"/v1/batches/{batch_id}", headers=op).json()
    assert batch["state"] == "unchecked"

    # Its check, cancelled before it ran, leaves the batch unchecked; a retry checks it.
    with session_scope(settings.sqlalchemy_url) as s:
        check_id = s.scalars(select(Job.id).where(Job.kind == "check", Job.state == "queued")).one()
    assert client.post(f"/v1/jobs/{check_id}/cancel", headers=op).status_code == 200
    assert client.get(f"/v1/batches/{batch_id}", headers=op).json()["state"] == "unchecked"
    assert _retry(client, keys.operator, check_id)[0] == 200
    assert run_queued(settings) == ["succeeded"]
    checked = client.get(f"/v1/batches/{batch_id}", headers=op).json()["state"]
    assert checked in ("passed", "failed")

    # Once the batch has moved on, neither job can be run again: a failed check job whose
    # batch a later check has since decided is refused, naming the batch's state.
    with session_scope(settings.sqlalchemy_url) as s:
        s.execute(update(Job).where(Job.id == check_id).values(state="failed"))
    status, body = _retry(client, keys.operator, check_id)
    assert status == 409 and f"batch job {check_id} worked on is now {checked}" in body["detail"]
    assert _retry(client, keys.operator, synth_id)[0] == 409  # succeeded
    assert _retry(client, keys.operator, "no-such-job")[0] == 404


def _dicom_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted((SHARED_DATA / "dicom").glob("*.dcm"))[:2]:
            zf.write(path, path.name)
    return buf.getvalue()


def test_cancelling_a_queued_upload_deletes_it_and_it_cannot_be_retried(
    client: TestClient, keys: Keys, settings: Settings
) -> None:
    r = client.post(
        "/v1/datasets/upload",
        files={"file": ("upload.zip", _dicom_zip(), "application/zip")},
        data={"spec": upload_spec()},
        headers=auth(keys.operator),
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    with session_scope(settings.sqlalchemy_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        upload = Path(job.params["upload_dir"])
    assert any(upload.rglob("*.dcm")), "the upload waits on disk for its ingest"

    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(keys.operator)).status_code == 200
    assert not upload.exists(), "the uploaded originals outlived their cancelled ingest"
    dataset = client.get("/v1/datasets/up", headers=auth(keys.operator)).json()
    assert [v["state"] for v in dataset["versions"]] == ["cancelled"]
    status, body = _retry(client, keys.operator, job_id)
    assert status == 409 and "upload them again" in body["detail"]
