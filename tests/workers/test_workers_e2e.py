"""End to end with a real worker process: once on the embedded default (SQLite file,
serverless broker) and once on PostgreSQL + Redis. The API runs in this process; every
job runs in the worker, reached only through the broker."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from support import NIH_INGEST, Keys, auth, copy_subset, make_keys, served

from synthray.app.main import create_app
from synthray.config import Settings
from synthray.models.checkpoint import load_state

pytestmark = pytest.mark.e2e

LEASE = 6


class Worker:
    """A `synthray worker` process in its own process group, logging to a file."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.log = log
        env = os.environ.copy() | {
            "SYNTHRAY_DEV_MODE": "true",
            "SYNTHRAY_DATA_DIR": str(settings.data_dir),
            "SYNTHRAY_DATABASE_URL": settings.sqlalchemy_url,
            "SYNTHRAY_BROKER_URL": settings.broker_url,
            "SYNTHRAY_JOB_LEASE_SECONDS": str(settings.job_lease_seconds),
            "SYNTHRAY_REQUEUE_AFTER_SECONDS": str(settings.requeue_after_seconds),
            "SYNTHRAY_QUALITY_ENCODER_STEPS": str(settings.quality_encoder_steps),
            "SYNTHRAY_QUALITY_SAMPLES_PER_CLASS": str(settings.quality_samples_per_class),
            "SYNTHRAY_COPYDETECT_SECONDS": str(settings.copydetect_seconds),
            "SYNTHRAY_COPYDETECT_STEPS": str(settings.copydetect_steps),
            "SYNTHRAY_MAX_DCR_TRAIN_SHARE": str(settings.max_dcr_train_share),
            "SYNTHRAY_WORKER_CHILD_MAX_MB": str(settings.worker_child_max_mb),
        }
        self._f = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "synthray.cli.main", "worker", "--queues", "gpu,cpu"],
            env=env,
            stdout=self._f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while b" ready." not in log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.2)

    def job_process(self) -> int | None:
        """The pid of the worker's pool process (the one that runs jobs), if it has one."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:  # the process ended meanwhile
                continue
            if int(fields[1]) == self.proc.pid and b"synthray.cli.main" in cmdline:
                return int(stat.parent.name)
        return None

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool child), as a crash would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._f.close()


@pytest.fixture(params=["embedded+sqlite", "redis+postgres"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    from conftest import REDIS_URL, _empty

    if request.param == "embedded+sqlite":
        db, broker = request.getfixturevalue("sqlite_url"), "embedded"
    else:
        db, broker = request.getfixturevalue("postgres_url"), REDIS_URL
        redis.Redis.from_url(REDIS_URL).flushdb()
    import_root = tmp_path / "import"
    import_root.mkdir()
    yield Settings(
        dev_mode=True,
        data_dir=tmp_path / "data",
        database_url=db,
        broker_url=broker,
        import_root=import_root,
        job_lease_seconds=LEASE,
        quality_encoder_steps=10,
        quality_samples_per_class=10,
        copydetect_seconds=2,
        copydetect_steps=4,
        # Test datasets hold a few dozen images: a record share over a dozen synthetic
        # images is too noisy to bound (the flagged-fraction rule is still tested).
        max_dcr_train_share=1.0,
        min_class_patients=1,  # a few patients per class (the refusal has its own test)
    )
    _empty(db)


@pytest.fixture
def api(stack: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(stack), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def worker(stack: Settings, tmp_path: Path) -> Iterator[Worker]:
    w = Worker(stack, tmp_path / "worker.log")
    yield w
    w.stop()


@pytest.fixture
def http_url(stack: Settings) -> Iterator[str]:
    """The same API served over real HTTP (uvicorn in a thread, a free port), for the CLI."""
    with served(stack) as url:
        yield url


def cli(url: str, key: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ.copy() | {"SYNTHRAY_URL": url, "SYNTHRAY_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "synthray.cli.main", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_job(api: TestClient, key: str, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
        if job["state"] in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def ingest(api: TestClient, keys: Keys, stack: Settings) -> None:
    assert stack.import_root is not None
    copy_subset(stack.import_root, per_class=10)
    r = api.post(
        "/v1/datasets",
        json={"name": "nih", "source": "nih", **NIH_INGEST},
        headers=auth(keys.operator),
    )
    assert r.status_code == 202, r.text
    job = wait_job(api, keys.operator, r.json()["job_id"])
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1


def test_pipeline_through_a_real_worker(
    api: TestClient, stack: Settings, worker: Worker, http_url: str, tmp_path: Path
) -> None:
    keys = make_keys(stack)
    op = auth(keys.operator)
    ingest(api, keys, stack)
    r = api.post(
        "/v1/train",
        json={"dataset": "nih", "model_name": "e2e", "max_steps": 4, "batch_size": 8},
        headers=op,
    )
    train_id = r.json()["job_id"]
    job = wait_job(api, keys.operator, train_id)
    assert job["state"] == "succeeded", (job, worker.log.read_text()[-2000:])
    assert job["result"]["metrics"]["steps"] == 4
    if os.environ.get("SYNTHRAY_DEVICE", "auto").startswith("cuda"):  # scripts/gpu_check.sh
        assert job["result"]["metrics"]["device"].startswith("cuda"), job["result"]
    # The CLI's file verbs, over real HTTP: a preview grid, the weights (admin only).
    r = cli(http_url, keys.operator, "jobs", "preview", train_id, "--dest", "p.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = cli(http_url, keys.operator, "models", "weights", "e2e", "1", "--dest", "w", cwd=tmp_path)
    assert r.returncode == 1 and "(403)" in r.stderr and not (tmp_path / "w").exists()
    r = cli(http_url, keys.admin, "models", "weights", "e2e", "1", "--dest", "w", cwd=tmp_path)
    assert r.returncode == 0 and "wrote w (" in r.stderr, r.stderr
    assert (tmp_path / "w").stat().st_size > 1000

    r = api.post("/v1/synthesize", json={"model": "e2e", "per_class": 4}, headers=op)
    assert r.status_code == 202
    batch_id = r.json()["batch_id"]
    synth = wait_job(api, keys.operator, r.json()["job_id"])
    assert synth["state"] == "succeeded", synth
    check = wait_job(api, keys.operator, synth["result"]["check_job_id"])
    assert check["state"] == "succeeded", check
    batch = api.get(f"/v1/batches/{batch_id}", headers=op).json()
    assert batch["state"] == "passed", batch

    r = api.post("/v1/exports", json={"batch_id": batch_id, "partner": "partner-a"}, headers=op)
    assert r.status_code == 202
    export_id = r.json()["export_id"]
    assert wait_job(api, keys.operator, r.json()["job_id"])["state"] == "succeeded"
    r = api.post(f"/v1/exports/{export_id}/approve", headers=auth(keys.reviewer))
    assert r.status_code == 200
    url = f"/v1/exports/{export_id}/download"
    assert api.get(url).status_code == 401
    assert api.get(url, headers=auth(keys.other_partner)).status_code == 404
    r = api.get(url, headers=auth(keys.partner))
    assert r.status_code == 200
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["exported_per_class"] == {"Normal": 4, "Effusion": 4, "Cardiomegaly": 4}
    r = cli(http_url, keys.partner, "download", str(export_id), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    whole = api.get(url, headers=auth(keys.partner))
    target = tmp_path / f"synthray-export-{export_id}.zip"
    assert target.read_bytes() == whole.content
    # A download that broke after 1,000 bytes resumes from there and is verified ...
    part = target.with_suffix(".zip.part")
    etag = target.with_suffix(".zip.part.etag")
    target.unlink()
    part.write_bytes(whole.content[:1000])
    etag.write_text(whole.headers["etag"])
    r = cli(http_url, keys.partner, "download", str(export_id), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == whole.content and not part.exists() and not etag.exists()
    trail = api.get("/v1/audit", headers=auth(keys.admin)).json()
    assert trail[0]["action"] == "download_export" and trail[0]["detail"]["range_start"] == 1000
    # ... and a damaged partial file is caught by the sha256, removed, and fetched anew.
    target.unlink()
    part.write_bytes(b"\0" * 1000)
    etag.write_text(whole.headers["etag"])
    r = cli(http_url, keys.partner, "download", str(export_id), cwd=tmp_path)
    assert r.returncode == 1 and "does not match its sha256" in r.stderr, r.stderr
    assert not part.exists() and not target.exists()
    r = cli(http_url, keys.partner, "download", str(export_id), cwd=tmp_path)
    assert r.returncode == 0 and target.read_bytes() == whole.content
    # The worker's own threads (the sweeper) ran without a database error all along: a
    # pool process that inherited its parent's PostgreSQL connection broke them once.
    assert "sweep failed" not in worker.log.read_text()


def test_a_job_process_that_grew_is_replaced(
    api: TestClient, stack: Settings, tmp_path: Path
) -> None:
    """A job process keeps its peak heap, so one that a job left above
    SYNTHRAY_WORKER_CHILD_MAX_MB is replaced before the next job (here a limit no job
    process fits under: every job gets a fresh one), and the jobs still run."""
    keys = make_keys(stack)
    w = Worker(stack.model_copy(update={"worker_child_max_mb": 1}), tmp_path / "grown.log")
    try:
        first = w.job_process()
        assert first is not None
        ingest(api, keys, stack)
        deadline = time.monotonic() + 60
        while w.job_process() in (first, None) and time.monotonic() < deadline:
            time.sleep(0.2)
        second = w.job_process()
        assert second not in (first, None), w.log.read_text()[-3000:]
        # The fresh process takes the next job.
        body = {"name": "nih-again", "source": "nih", **NIH_INGEST}
        r = api.post("/v1/datasets", json=body, headers=auth(keys.operator))
        assert r.status_code == 202, r.text
        assert wait_job(api, keys.operator, r.json()["job_id"])["state"] == "succeeded"
    finally:
        w.stop()


def test_killed_worker_loses_no_job(api: TestClient, stack: Settings, tmp_path: Path) -> None:
    """SIGKILL the whole worker mid-training: the job runs again on a new worker, resumes
    from its last checkpoint and ends at exactly the asked step count."""
    keys = make_keys(stack)
    # Enough steps that the first checkpoint (after 1 s) comes before the end, however fast
    # the CPU: on an AMX Xeon 12 steps finished inside the first second.
    steps = 60
    first = Worker(stack, tmp_path / "worker1.log")
    try:
        ingest(api, keys, stack)
        r = api.post(
            "/v1/train",
            json={
                "dataset": "nih",
                "model_name": "k",
                "max_steps": steps,
                "batch_size": 8,
                "checkpoint_every_s": 1,
                "evaluate": False,
            },
            headers=auth(keys.operator),
        )
        job_id = r.json()["job_id"]
        ckpt = stack.work_dir / "jobs" / job_id / "checkpoint.safetensors"
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert time.monotonic() < deadline, first.log.read_text()[-2000:]
            time.sleep(0.1)
        first.kill()
        _, meta = load_state(ckpt)
        assert 0 < meta["step"] < steps, "the worker must die mid-training"
    finally:
        first.stop()
    job = api.get(f"/v1/jobs/{job_id}", headers=auth(keys.operator)).json()
    assert job["state"] == "running"  # the dead worker still holds the lease

    second = Worker(stack, tmp_path / "worker2.log")
    try:
        job = wait_job(api, keys.operator, job_id, timeout=240)
    finally:
        second.stop()
    assert job["state"] == "succeeded", (job, (tmp_path / "worker2.log").read_text()[-3000:])
    assert job["attempts"] == 2
    assert job["result"]["metrics"]["steps"] == steps
    versions = api.get("/v1/models/k", headers=auth(keys.reviewer)).json()["versions"]
    assert len(versions) == 1
