"""A partner's download: it resumes where it broke (Range, If-Range with the bundle's
sha256 as ETag) without counting as a second download, the unpacked bundle checks itself
with `sha256sum -c SHA256SUMS`, and the grant's end and download limit are enforced and
audited. Real bundles built from a batch that passed the gate, both databases."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import zipfile
from datetime import timedelta
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from conftest import World
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update
from support import Keys, auth, run_queued

from synthray.app.db import session_scope, utcnow
from synthray.app.exports import service
from synthray.app.exports.tables import Export
from synthray.config import Settings


def _approved(client: TestClient, keys: Keys, settings: Settings, seed: int) -> int:
    op = auth(keys.operator)
    r = client.post("/v1/synthesize", json={"model": "m", "per_class": 3, "seed": seed}, headers=op)
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded", "succeeded"]
    r = client.post(
        "/v1/exports", json={"batch_id": r.json()["batch_id"], "partner": "partner-a"}, headers=op
    )
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded"]
    export_id = int(r.json()["export_id"])
    r = client.post(f"/v1/exports/{export_id}/approve", headers=auth(keys.reviewer))
    assert r.status_code == 200, r.text
    return export_id


def test_a_broken_download_resumes_and_the_bundle_checks_itself(
    client: TestClient,
    keys: Keys,
    settings: Settings,
    trained: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.export_max_downloads = 1
    settings.dicom_uid_root = "1.2.826.0.1.3680043.10.999."
    export_id = _approved(client, keys, settings, seed=11)
    url, partner = f"/v1/exports/{export_id}/download", auth(keys.partner)
    whole = client.get(url, headers=partner)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    sha = hashlib.sha256(whole.content).hexdigest()
    assert whole.headers["etag"] == f'"{sha}"' and whole.headers["x-content-sha256"] == sha
    # The connection broke after 1,000 bytes: ask for the rest, only if it is the same bundle.
    rest = client.get(url, headers=partner | {"Range": "bytes=1000-", "If-Range": f'"{sha}"'})
    assert rest.status_code == 206, rest.text
    assert (
        rest.headers["content-range"] == f"bytes 1000-{len(whole.content) - 1}/{len(whole.content)}"
    )
    assert whole.content[:1000] + rest.content == whole.content
    # With a stale If-Range the whole bundle comes back: still a resumption of the download.
    stale = client.get(url, headers=partner | {"Range": "bytes=1000-", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == whole.content
    # A second download from the first byte is over the limit of one.
    again = client.get(url, headers=partner)
    assert again.status_code == 403 and "all are used" in again.json()["detail"]
    # Partial requests cannot stand in for downloads without end: once the resume window
    # is over, they are refused too.
    monkeypatch.setattr(service, "RESUME_WINDOW", timedelta(0))
    late = client.get(url, headers=partner | {"Range": "bytes=1-"})
    assert late.status_code == 403 and "download it from the start" in late.json()["detail"]
    trail = client.get("/v1/audit", headers=auth(keys.admin)).json()
    downloads = [
        e for e in trail if e["action"] == "download_export" and e["actor_name"] == "partner-a"
    ][::-1]
    assert [(e["outcome"], e["detail"].get("range_start")) for e in downloads] == [
        ("ok", 0),
        ("ok", 1000),
        ("ok", 1000),
        ("refused", None),
        ("refused", None),
    ]
    # Admins are not limited by the partner's grant.
    assert client.get(url, headers=auth(keys.admin)).status_code == 200

    folder = tmp_path / "bundle"
    with zipfile.ZipFile(io.BytesIO(whole.content)) as zf:
        zf.extractall(folder)
    checked = subprocess.run(
        ["sha256sum", "--check", "--strict", "SHA256SUMS"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Every DICOM file validates against the standard (dicom3tools' dciodvfy): no error,
    # no warning; one synthetic study, one series per class.
    dicoms = sorted(folder.rglob("*.dcm"))
    assert dicoms
    assert shutil.which("dciodvfy"), "dicom3tools is needed (apt-get install dicom3tools)"
    for path in dicoms:
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        said = (out.stdout + out.stderr).splitlines()
        assert [x for x in said if x.startswith(("Error", "Warning"))] == [], (path.name, said)
    # highdicom reads every one back, pixels equal to the PNG of the same image.
    for path in dicoms:
        png = folder / "png" / path.parent.name / (path.stem + ".png")
        pixels = np.asarray(Image.open(png))
        assert np.array_equal(highdicom.imread(str(path)).get_frame(1).astype(np.uint8), pixels)
    headers = [pydicom.dcmread(p) for p in dicoms]
    # Files are assembled from a series encoded once: byte for byte what pydicom itself
    # writes when it saves the whole dataset it reads back.
    for path, ds in zip(dicoms, headers, strict=True):
        again = io.BytesIO()
        ds.save_as(again, enforce_file_format=True)
        assert again.getvalue() == path.read_bytes(), path.name
    assert len({h.StudyInstanceUID for h in headers}) == 1
    assert len({h.SeriesInstanceUID for h in headers}) == len({p.parent.name for p in dicoms})
    assert all(h.ConversionType == "SYN" and "SYNTHETIC" in h.ImageType for h in headers)
    assert all("m v1" in h.SecondaryCaptureDeviceManufacturerModelName for h in headers)
    assert all(h.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.999.") for h in headers)
    listed = (folder / "SHA256SUMS").read_text().splitlines()
    assert len(listed) == sum(1 for p in folder.rglob("*") if p.is_file()) - 1
    (folder / "manifest.json").write_text("{}")
    tampered = subprocess.run(
        ["sha256sum", "--check", "--quiet", "SHA256SUMS"],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    assert tampered.returncode != 0 and "manifest.json: FAILED" in tampered.stdout


def test_a_grant_ends_and_the_refusal_is_audited(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    settings.export_download_days = 7
    export_id = _approved(client, keys, settings, seed=12)
    url, partner = f"/v1/exports/{export_id}/download", auth(keys.partner)
    assert client.get(url, headers=partner).status_code == 200
    with session_scope(settings.sqlalchemy_url) as s:
        s.execute(
            update(Export)
            .where(Export.id == export_id)
            .values(approved_at=utcnow() - timedelta(days=8))
        )
    r = client.get(url, headers=partner)
    assert r.status_code == 403 and "grant of export" in r.json()["detail"]
    trail = client.get("/v1/audit", headers=auth(keys.admin)).json()
    last = next(e for e in trail if e["action"] == "download_export")
    assert last["outcome"] == "refused" and last["detail"]["reason"] == "grant expired"
    settings.export_download_days = 0  # no end
    assert client.get(url, headers=partner).status_code == 200
