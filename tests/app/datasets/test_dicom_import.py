"""Server-side import of a PACS export folder of DICOM files, by file name, with
duplicates detected and recorded rather than ingested twice."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pydicom
from dicom_factory import load_pixels, make_dicom
from fastapi.testclient import TestClient
from support import Keys, auth, nih_dir, run_queued

from synthray.app.datasets.tables import DatasetVersion
from synthray.app.db import session_scope
from synthray.app.storage import BlobStore
from synthray.config import Settings


def test_import_folder_with_duplicates(client: TestClient, keys: Keys, settings: Settings) -> None:
    assert settings.import_root is not None
    folder = settings.import_root / "pacs" / "2024"
    folder.mkdir(parents=True)
    pngs = sorted((nih_dir() / "images").glob("*.png"))
    rows = []
    for i in range(8):
        make_dicom(folder / f"a{i}.dcm", i + 1, load_pixels(pngs[i], 300), patient=i // 2 + 1)
        rows.append(
            {
                "file": f"2024/a{i}.dcm",
                "label": "Normal" if i % 2 else "Effusion",
                "pid": f"P{i // 2}",
            }
        )
    # The same file twice (same SOPInstanceUID), and the same pixels under a new UID.
    shutil.copyfile(folder / "a0.dcm", folder / "copy.dcm")
    ds = pydicom.dcmread(folder / "a1.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "same-pixels.dcm")
    rows += [
        {"file": "2024/copy.dcm", "label": "Effusion", "pid": "P0"},
        {"file": "2024/same-pixels.dcm", "label": "Normal", "pid": "P0"},
    ]
    with (settings.import_root / "pacs" / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "label", "pid"])
        w.writeheader()
        w.writerows(rows)

    body = {
        "name": "pacs",
        "source": "pacs",
        "label_column": "label",
        "patient_column": "pid",
        "classes": ["Normal", "Effusion"],
        "resolutions": [64, 256],
    }
    r = client.post("/v1/datasets", json=body, headers=auth(keys.operator))
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded"]
    job = client.get(f"/v1/jobs/{r.json()['job_id']}", headers=auth(keys.operator)).json()
    counts = job["result"]["counts"]
    assert counts["images"] == 8
    assert counts["skip_reasons"] == {
        "duplicate SOPInstanceUID of an earlier file": 1,
        "exact duplicate of an earlier image": 1,
    }
    assert {s["item"] for s in job["result"]["skipped"]} == {"row 10", "row 11"}
    with session_scope(settings.sqlalchemy_url) as s:
        blob = s.query(DatasetVersion.images_blob).scalar()
    arrays = BlobStore(settings.blob_dir).get_arrays(blob)
    assert arrays["images_64"].shape == (8, 64, 64)
    assert arrays["images_256"].shape == (8, 256, 256)
    # 300x300 sources padded, never squashed: a square source fills the square.
    assert float(np.mean(arrays["images_256"][:, :, :4])) > 1.0
