"""PostgreSQL goes away and comes back while the API and a real worker run: a private
cluster of the test's own (initdb on a free port), never the shared one. During the
outage the probes tell the truth (liveness up, readiness 503), requests get 503 with
Retry-After rather than 500, and after it both the API and the same worker process carry
on without a restart, with nothing written before the outage lost."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_settings
from fastapi.testclient import TestClient
from support import NIH_INGEST, auth, copy_subset, free_port, make_keys

from synthray.app.db import engine_for
from synthray.app.main import create_app
from synthray.migrations import upgrade


class PrivateCluster:
    """A PostgreSQL cluster in a temporary folder, started and stopped at will. As root it
    runs as the ``postgres`` user (initdb refuses root)."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        assert found, "PostgreSQL server binaries not found under /usr/lib/postgresql"
        self.bin = Path(found[-1]).parent
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="synthray-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-w",
            "-l", str(self.root / "log"), "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
             "stop"],
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    c = PrivateCluster()
    c.init()
    c.start()
    yield c
    engine_for(c.url).dispose()
    c.remove()


def _wait_job(client: TestClient, key: str, job_id: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}", headers=auth(key))
        if r.status_code == 200 and r.json()["state"] in ("succeeded", "failed"):
            return dict(r.json())
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {seconds} s")


@pytest.mark.e2e
def test_api_and_worker_ride_out_a_database_outage(cluster: PrivateCluster, tmp_path: Path) -> None:
    upgrade(cluster.url)
    s = make_settings(tmp_path, cluster.url)
    copy_subset(s.import_root, per_class=2)
    keys = make_keys(s)
    env = os.environ | {
        "SYNTHRAY_DEV_MODE": "true",
        "SYNTHRAY_DATABASE_URL": cluster.url,
        "SYNTHRAY_DATA_DIR": str(s.data_dir),
        "SYNTHRAY_IMPORT_ROOT": str(s.import_root),
        "SYNTHRAY_BROKER_URL": "embedded",
        "SYNTHRAY_JOB_LEASE_SECONDS": "8",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "synthray.cli.main", "worker", "--queues", "cpu"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "worker.log", "wb"),  # noqa: SIM115 (closed with the process)
    )
    op = auth(keys.operator)
    try:
        with TestClient(create_app(s), raise_server_exceptions=False) as c:
            body = {"name": "before", "source": "nih"} | NIH_INGEST
            first = c.post("/v1/datasets", json=body, headers=op).json()["job_id"]
            assert _wait_job(c, keys.operator, first, 120)["state"] == "succeeded"
            assert c.get("/v1/me", headers=auth("sr_0_guess")).status_code == 401  # audited

            cluster.stop()
            assert c.get("/healthz").status_code == 200
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["database"].startswith("unavail")
            for method, url, kw in (
                ("GET", f"/v1/jobs/{first}", {}),
                ("GET", "/v1/datasets", {}),
                ("POST", "/v1/datasets", {"json": body | {"name": "during"}}),
            ):
                r = c.request(method, url, headers=op, **kw)
                assert r.status_code == 503, (method, url, r.status_code, r.text)
                assert r.headers.get("retry-after") and "database" in r.json()["detail"]
            time.sleep(3)  # the worker's sweeper and heartbeats meet the outage too
            assert worker.poll() is None, "the worker exited during the outage"

            cluster.start()
            deadline = time.monotonic() + 30
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, c.get("/readyz").json()
                time.sleep(0.5)
            # The same API and the same worker process go on.
            after = c.post("/v1/datasets", json=body | {"name": "after"}, headers=op)
            assert after.status_code == 202, after.text
            job = _wait_job(c, keys.operator, after.json()["job_id"], 120)
            assert job["state"] == "succeeded", job
            assert worker.poll() is None
            # Nothing from before the outage is lost: the first job, its dataset, the
            # audit record of the refused request.
            assert c.get(f"/v1/jobs/{first}", headers=op).json()["state"] == "succeeded"
            names = {d["name"] for d in c.get("/v1/datasets", headers=op).json()}
            assert names == {"before", "after"}
            trail = c.get("/v1/audit", headers=auth(keys.admin)).json()
            assert any(e["outcome"] == "refused" and e["object_id"] == "GET /v1/me" for e in trail)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=40)
        except subprocess.TimeoutExpired:
            worker.kill()


def test_a_read_after_a_database_restart_is_answered(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    """The read pool keeps connections without pinging them before use (``db.read_engine``):
    after PostgreSQL restarts, the first read meets a closed connection and is made again
    on a fresh one, so the client gets its answer, not a 503; a second restart is survived
    the same way."""
    from synthray.app.db import session_scope
    from synthray.app.jobs import service as jobs
    from synthray.app.jobs.schemas import JobKind

    upgrade(cluster.url)
    s = make_settings(tmp_path, cluster.url)
    keys = make_keys(s)
    with session_scope(cluster.url) as db:
        job_id = jobs.create(db, s, JobKind.export, {"test": True}, None).id
    op = auth(keys.operator)
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        for _ in range(2):
            for _ in range(3):  # the read pool holds a connection from before the restart
                assert c.get(f"/v1/jobs/{job_id}", headers=op).status_code == 200
            cluster.stop()
            cluster.start()
            first = c.get(f"/v1/jobs/{job_id}", headers=op)
            assert first.status_code == 200, first.text
            assert first.json()["id"] == job_id
            # A refusal on the same pool is audited after a restart as well.
            assert c.get("/v1/keys", headers=op).status_code == 403
        trail = c.get("/v1/audit", headers=auth(keys.admin)).json()
        assert sum(e["object_id"] == "GET /v1/keys" for e in trail) == 2
