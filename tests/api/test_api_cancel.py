"""Cancelling: a queued job at once; a running training job at its next heartbeat, with
its last checkpoint kept."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient
from support import NIH_INGEST, Keys, auth, copy_subset, run_queued

from synthray.config import Settings
from synthray.workers.runner import run


def test_cancel_queued_and_running(client: TestClient, keys: Keys, settings: Settings) -> None:
    assert settings.import_root is not None
    copy_subset(settings.import_root, per_class=6)
    op = auth(keys.operator)
    r = client.post("/v1/datasets", json={"name": "nih", "source": "nih", **NIH_INGEST}, headers=op)
    assert run_queued(settings) == ["succeeded"]
    body = {
        "dataset": "nih",
        "model_name": "m",
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
    settings.job_lease_seconds = 4  # heartbeats every second
    job_id = client.post("/v1/train", json=body, headers=op).json()["job_id"]
    states: list[str] = []
    worker = threading.Thread(target=lambda: states.append(run(job_id, settings)))
    worker.start()
    ckpt = settings.work_dir / "jobs" / job_id / "checkpoint.safetensors"
    deadline = time.monotonic() + 60
    while not ckpt.exists():
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    asked = time.monotonic()
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=op).status_code == 200
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert states == ["cancelled"]
    assert time.monotonic() - asked < 15
    job = client.get(f"/v1/jobs/{job_id}", headers=op).json()
    assert job["state"] == "cancelled" and job["cancel_requested"] is True
    assert ckpt.exists()  # the last checkpoint is kept
    assert client.get("/v1/models", headers=op).json() == []  # nothing registered
