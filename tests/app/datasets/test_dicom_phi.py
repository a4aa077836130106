"""Planted PHI never comes back out.

DICOM files with identifiers planted in 27 places (names, ids, dates, institution,
nested sequences three levels deep, private elements and a private sequence, overlay
text, SR text, descriptions, OtherPatientIDsSequence; UTF-8 and Latin-1 character sets)
are uploaded and run through the whole pipeline. Then every byte the system stored,
logged, returned or exported is searched for every planted token.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import load_pixels, make_dicom, planted_strings
from fastapi.testclient import TestClient
from sqlalchemy import select
from support import Keys, auth, nih_dir, run_queued

from synthray import logs
from synthray.app.db import Base, session_scope
from synthray.config import Settings

PATIENTS = 6
PER_PATIENT = 3


def _build_upload(tmp: Path) -> tuple[bytes, list[str]]:
    pngs = sorted((nih_dir() / "images").glob("*.png"))
    folder = tmp / "pacs"
    folder.mkdir()
    rows = []
    planted: list[str] = []
    n = 0
    for p in range(PATIENTS):
        for k in range(PER_PATIENT):
            n += 1
            charset = "ISO_IR 192" if n % 2 else "ISO_IR 100"
            pixels = load_pixels(pngs[n], 128)
            uid = make_dicom(folder / f"IM{n:04d}.dcm", n, pixels, patient=p + 1, charset=charset)
            rows.append({"sop_uid": uid, "finding": ["Normal", "Effusion"][(p + k) % 2]})
            planted += planted_strings(n)
    # A file that declares burned-in text is refused by default.
    n += 1
    make_dicom(folder / "burned.dcm", n, load_pixels(pngs[n], 128), patient=1, burned_in="YES")
    planted += planted_strings(n)
    with (folder / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sop_uid", "finding"])
        w.writeheader()
        w.writerows(rows)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, f"export/{p.name}")
    return buf.getvalue(), sorted(set(planted))


def _needles(strings: list[str]) -> list[bytes]:
    out = set()
    for s in strings:
        for enc in ("utf-8", "latin-1", "utf-16-le"):
            out.add(s.encode(enc, errors="ignore"))
    return sorted(out)


def _expand(name: str, data: bytes) -> list[tuple[str, bytes]]:
    """Bytes to search: the data itself and, for zips, every member uncompressed."""
    found = [(name, data)]
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for m in zf.namelist():
                found.append((f"{name}!{m}", m.encode()))
                found.append((f"{name}!{m}", zf.read(m)))
    return found


def test_no_planted_phi_anywhere(
    client: TestClient,
    keys: Keys,
    settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    caplog.set_level(logging.DEBUG)
    # And the JSON lines a deployment's log collector receives (request and job ids).
    json_log = io.StringIO()
    json_handler = logging.StreamHandler(json_log)
    json_handler.setFormatter(logs.JsonFormatter())
    json_handler.addFilter(logs.ContextIds())
    logging.getLogger().addHandler(json_handler)
    request.addfinalizer(lambda: logging.getLogger().removeHandler(json_handler))
    # 18 images from 6 patients calibrate nothing reliably; this test is about PHI, so the
    # batch policy is relaxed to let the export path run (flagged images still stay out).
    settings.max_flagged_fraction = 1.0
    settings.max_dcr_train_share = 1.0
    upload, planted = _build_upload(tmp_path)
    assert len(planted) >= 20 * (PATIENTS * PER_PATIENT)
    responses: list[bytes] = []
    op, rev = auth(keys.operator), auth(keys.reviewer)

    def call(method: str, url: str, **kw: object) -> dict:
        r = client.request(method, url, **kw)  # type: ignore[arg-type]
        responses.append(r.content)
        assert r.status_code < 400, (url, r.text)
        return r.json() if r.headers.get("content-type") == "application/json" else {}

    spec = {
        "name": "pacs",
        "labels_csv": "export/labels.csv",
        "file_column": None,
        "sop_column": "sop_uid",
        "label_column": "finding",
        "patient_column": None,
        "classes": ["Normal", "Effusion"],
        "resolutions": [64, 128],
        "holdout_fraction": 0.2,
    }
    acc = call(
        "POST",
        "/v1/datasets/upload",
        headers=op,
        data={"spec": json.dumps(spec)},
        files={"file": ("pacs.zip", upload, "application/zip")},
    )
    assert run_queued(settings) == ["succeeded"]
    job = call("GET", f"/v1/jobs/{acc['job_id']}", headers=op)
    counts = job["result"]["counts"]
    assert counts["images"] == PATIENTS * PER_PATIENT
    assert counts["patients"] == PATIENTS
    assert counts["skip_reasons"] == {"DICOM file declares burned-in annotation": 1}
    assert counts["formats"] == {"dicom": PATIENTS * PER_PATIENT}
    ds = call("GET", "/v1/datasets/pacs", headers=op)
    assert ds["versions"][0]["resolutions"] == [64, 128]

    acc = call(
        "POST",
        "/v1/train",
        headers=op,
        json={"dataset": "pacs", "model_name": "pacs-gan", "max_steps": 2, "batch_size": 4},
    )
    assert run_queued(settings) == ["succeeded"]
    call("GET", f"/v1/jobs/{acc['job_id']}", headers=op)
    acc = call("POST", "/v1/synthesize", headers=op, json={"model": "pacs-gan", "per_class": 3})
    assert run_queued(settings) == ["succeeded", "succeeded"]
    batch = call("GET", f"/v1/batches/{acc['batch_id']}", headers=op)
    call("GET", f"/v1/batches/{acc['batch_id']}/report", headers=op)
    assert batch["state"] == "passed", batch  # so that the export path below runs
    acc = call(
        "POST",
        "/v1/exports",
        headers=op,
        json={"batch_id": batch["id"], "partner": "partner-a"},
    )
    assert run_queued(settings) == ["succeeded"]
    call("POST", f"/v1/exports/{acc['export_id']}/approve", headers=rev)
    call("GET", f"/v1/exports/{acc['export_id']}/download", headers=auth(keys.partner))
    for url in (
        "/v1/jobs?limit=100",
        "/v1/models",
        "/v1/datasets",
        "/v1/audit",
        "/v1/exports",
        "/v1/batches",
    ):
        call("GET", url, headers=auth(keys.admin))

    # Everything the system kept: files (names and bytes), database rows, logs, answers.
    haystacks: list[tuple[str, bytes]] = []
    for p in sorted(settings.data_dir.rglob("*")):
        haystacks.append((f"name:{p}", str(p.relative_to(settings.data_dir)).encode()))
        if p.is_file():
            haystacks += _expand(str(p), p.read_bytes())
    with session_scope(settings.sqlalchemy_url) as s:
        for table in Base.metadata.sorted_tables:
            rows = s.execute(select(table)).all()
            haystacks.append((f"table:{table.name}", repr(rows).encode()))
            haystacks.append(
                (
                    f"json:{table.name}",
                    json.dumps([list(r) for r in rows], default=str, ensure_ascii=False).encode(),
                )
            )
    haystacks.append(("logs", caplog.text.encode()))
    haystacks.append(("json logs", json_log.getvalue().encode()))
    assert json_log.getvalue().count("\n") > 10
    for i, body in enumerate(responses):
        haystacks += _expand(f"response {i}", body)
    assert len(haystacks) > 50

    leaks = [
        (where, n.decode("latin-1"))
        for where, data in haystacks
        for n in _needles(planted)
        if n and n in data
    ]
    assert leaks == [], leaks[:10]
    # The uploaded originals are gone.
    assert not any((settings.work_dir / "uploads").iterdir())
    print(
        f"planted {len(planted)} strings in {PATIENTS * PER_PATIENT + 1} files; "
        f"searched {len(haystacks)} places; found {len(leaks)}"
    )


def test_planted_strings_are_really_in_the_files(tmp_path: Path) -> None:
    """Guards the test above: the factory's files do carry every token."""
    path = tmp_path / "x.dcm"
    make_dicom(path, 3, np.full((16, 16), 5, dtype=np.uint16))
    data = path.read_bytes()
    assert all(s.encode() in data for s in planted_strings(3))
    assert len(planted_strings(3)) >= 20
