"""Helpers shared by the tests (imported as ``support``)."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from synthray.app.auth.schemas import Role
from synthray.app.auth.service import create_key
from synthray.app.db import session_scope
from synthray.config import Settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SYNTHRAY_TEST_DATA", ROOT.parent / "shared" / "data"))

# The browser tests: Debian's chromium, screenshots outside git.
CHROMIUM = os.environ.get("SYNTHRAY_CHROMIUM") or shutil.which("chromium")
SHOTS = Path(os.environ.get("SYNTHRAY_TEST_ARTEFACTS", ROOT / "var" / "test-artefacts"))
SHOTS = SHOTS / "screenshots"


def needs_chromium() -> pytest.MarkDecorator:
    """Skip without chromium, unless SYNTHRAY_REQUIRE_BROWSER says it must be there."""
    if CHROMIUM is None and os.environ.get("SYNTHRAY_REQUIRE_BROWSER"):
        raise RuntimeError("SYNTHRAY_REQUIRE_BROWSER is set but there is no chromium to drive")
    return pytest.mark.skipif(
        CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)"
    )


def nih_dir() -> Path:
    path = SHARED_DATA / "nih-cxr14-64"
    if not (path / "labels.csv").is_file():
        pytest.fail(f"reference data missing at {path} (set SYNTHRAY_TEST_DATA)")
    return path


@functools.cache
def load_nih() -> tuple[np.ndarray, np.ndarray]:
    """Every film of the NIH subset (uint8 (N, 64, 64), in labels.csv order) and its patient
    ID; read once per test process and returned read-only."""
    folder = nih_dir()
    images, patients = [], []
    with (folder / "labels.csv").open(newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            with Image.open(folder / row["file"]) as im:
                images.append(np.asarray(im.convert("L"), dtype=np.uint8))
            patients.append(row["Patient ID"].strip())
    out = np.stack(images), np.array(patients)
    for a in out:
        a.setflags(write=False)  # shared by every caller in the process
    return out


@dataclass
class Keys:
    admin: str
    operator: str
    reviewer: str
    partner: str
    other_partner: str


def make_keys(settings: Settings) -> Keys:
    with session_scope(settings.sqlalchemy_url) as s:
        k = {
            name: create_key(s, settings.secret_key, name, role).key
            for name, role in [
                ("admin", Role.admin),
                ("operator", Role.operator),
                ("reviewer", Role.reviewer),
                ("partner-a", Role.partner),
                ("partner-b", Role.partner),
            ]
        }
    return Keys(k["admin"], k["operator"], k["reviewer"], k["partner-a"], k["partner-b"])


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _pick(
    every: list[dict[str, str]], per_class: int, skipped: set[str], one_per_patient: bool
) -> list[dict[str, str]]:
    wanted = {"No Finding": per_class, "Effusion": per_class, "Cardiomegaly": per_class}
    skipped = set(skipped)
    rows = []
    for r in every:
        lab = r["Finding Labels"]
        if wanted.get(lab, 0) > 0 and r["Patient ID"] not in skipped:
            wanted[lab] -= 1
            rows.append(r)
            if one_per_patient:
                skipped.add(r["Patient ID"])
    return rows


def copy_subset(
    dest: Path,
    per_class: int = 30,
    name: str = "nih",
    *,
    skip_first: int = 0,
    one_per_patient: bool = False,
) -> Path:
    """Copy a small, labelled slice of the NIH reference set into an import folder.

    ``skip_first`` leaves out the patients of the slice ``copy_subset(per_class=skip_first)``
    would copy, with or without ``one_per_patient``, so the two slices share no patient.
    ``one_per_patient``: at most one film of each patient (so a small slice still has
    held-out patients of every class).
    """
    src = nih_dir()
    folder = dest / name
    (folder / "images").mkdir(parents=True)
    with (src / "labels.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        every = list(reader)
    skipped: set[str] = set()
    if skip_first:  # the patients of the first slice, chosen as the first call chose them
        first = _pick(every, skip_first, set(), one_per_patient=True)
        first += _pick(every, skip_first, set(), one_per_patient=False)
        skipped = {r["Patient ID"] for r in first}
    rows = _pick(every, per_class, skipped, one_per_patient)
    for r in rows:
        shutil.copyfile(src / r["file"], folder / r["file"])
    with (folder / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return folder


def plant_bad_rows(folder: Path) -> Path:
    """Rows that must be skipped, each for its own reason."""
    (folder / "images" / "not-an-image.png").write_bytes(b"hello, I am text")
    first = sorted((folder / "images").glob("*.png"))[0]
    good = first.read_bytes()
    rel = f"images/{first.name}"
    (folder / "images" / "truncated.png").write_bytes(good[: len(good) // 3])
    with (folder / "labels.csv").open("a") as f:
        f.write("images/not-an-image.png,x,Effusion,0,9001,50,M,PA,1,1,1,1,0,1,0,0,0,0,0,0\n")
        f.write("images/truncated.png,x,Effusion,0,9002,50,M,PA,1,1,1,1,0,1,0,0,0,0,0,0\n")
        f.write("images/missing.png,x,Effusion,0,9003,50,M,PA,1,1,1,1,0,1,0,0,0,0,0,0\n")
        f.write("../../etc/passwd,x,Effusion,0,9004,50,M,PA,1,1,1,1,0,1,0,0,0,0,0,0\n")
        f.write(f"{rel},x,Effusion|Cardiomegaly,0,9005,50,M,PA,1,1,1,1,0,1,0,0,0,0,0,0\n")
        f.write(f"{rel},x,Hernia,0,9006,50,M,PA,1,1,1,1,0,1,0,0,0,0,0,0\n")
    return folder


NIH_INGEST = {
    "file_column": "file",
    "label_column": "Finding Labels",
    "label_separator": "|",
    "label_map": {"No Finding": "Normal"},
    "patient_column": "Patient ID",
    "classes": ["Normal", "Effusion", "Cardiomegaly"],
    "view_column": "View Position",
    "sex_column": "Patient Gender",
    "age_column": "Patient Age",
}


def run_queued(settings: Settings, limit: int = 20) -> list[str]:
    """Run queued jobs in this process, oldest first, the way a worker would (the same
    claim, lease and handler code), without a broker. Returns the final states."""
    from sqlalchemy import select

    from synthray.app.jobs.tables import Job
    from synthray.workers.runner import run

    states = []
    for _ in range(limit):
        with session_scope(settings.sqlalchemy_url) as s:
            job_id = s.scalars(
                select(Job.id).where(Job.state == "queued").order_by(Job.created_at).limit(1)
            ).first()
        if job_id is None:
            break
        states.append(run(job_id, settings))
    return states


def cancel_mid_training(
    client: TestClient, settings: Settings, operator: str, body: dict
) -> tuple[str, Path]:
    """Start a training job (``body``) in a thread the way a worker runs it, cancel it once
    its first checkpoint exists, and return its id and that checkpoint's path; the job
    ends ``cancelled`` within a minute (heartbeats every second)."""
    from synthray.workers.runner import run

    settings.job_lease_seconds = 4  # heartbeats every second: the cancel is seen quickly
    job_id = client.post("/v1/train", json=body, headers=auth(operator)).json()["job_id"]
    states: list[str] = []
    worker = threading.Thread(target=lambda: states.append(run(job_id, settings)))
    worker.start()
    ckpt = settings.work_dir / "jobs" / job_id / "checkpoint.safetensors"
    deadline = time.monotonic() + 60
    while not ckpt.exists():
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    asked = time.monotonic()
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(operator))
    assert r.status_code == 200, r.text
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert states == ["cancelled"]
    assert time.monotonic() - asked < 15
    return job_id, ckpt


def upload_spec(**overrides: object) -> str:
    """The ``spec`` form field of a dataset upload labelled by a DICOM attribute."""
    body = {
        "name": "up",
        "labels_csv": None,
        "file_column": None,
        "label_column": None,
        "patient_column": None,
        "label_attribute": "StudyDescription",
        "label_map": {},
        "classes": ["A", "B"],
    } | overrides
    return json.dumps(body)


def free_port() -> int:
    """A TCP port nothing listens on now (for a server a test starts itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def synthray_cli(
    settings: Settings, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run a server-side `synthray` verb (db, store, audit, worker ...) as an operator
    would, in a subprocess, on the test's database and data folder."""
    env = os.environ | {
        "SYNTHRAY_DEV_MODE": "true",
        "SYNTHRAY_DATA_DIR": str(settings.data_dir),
        "SYNTHRAY_DATABASE_URL": settings.sqlalchemy_url,
    }
    return subprocess.run(
        [sys.executable, "-m", "synthray.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def built_export(
    client: TestClient, requester: str, settings: Settings, seed: int, partner: str = "partner-a"
) -> int:
    """Synthesize a small batch of model "m" (4 images per class), let it pass the gate,
    and build an export of it for ``partner``, requested by ``requester``; its id."""
    r = client.post(
        "/v1/synthesize", json={"model": "m", "per_class": 4, "seed": seed}, headers=auth(requester)
    )
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded", "succeeded"]
    body = {"batch_id": r.json()["batch_id"], "partner": partner}
    r = client.post("/v1/exports", json=body, headers=auth(requester))
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded"]
    return int(r.json()["export_id"])


@contextlib.contextmanager
def served(settings: Settings) -> Iterator[str]:
    """The API for ``settings`` over real HTTP (uvicorn in a thread, a free port); its URL."""
    import uvicorn

    from synthray.app.main import create_app

    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and server.servers):
        assert time.monotonic() < deadline and thread.is_alive(), "the API server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
