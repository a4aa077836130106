"""Vetting images made elsewhere: copies of training images are caught, the report and
evidence page come back, and nothing checked can be exported."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
from conftest import World
from fastapi.testclient import TestClient
from PIL import Image
from support import Keys, auth, run_queued

from synthray.app.datasets import service as datasets
from synthray.app.db import session_scope
from synthray.app.storage import BlobStore
from synthray.config import Settings


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "L").save(buf, format="PNG")
    return buf.getvalue()


def test_check_uploaded_images(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    op = auth(keys.operator)
    with session_scope(settings.sqlalchemy_url) as s:
        dv = client.get("/v1/datasets/nih", headers=op).json()["versions"][0]
        split = datasets.load_split(s, BlobStore(settings.blob_dir), dv["id"])
    copies = split.train_images[:6]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(6, 64, 64), dtype=np.uint8)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, img in enumerate([*copies, *noise]):
            zf.writestr(f"elsewhere/{i:02d}.png", _png(img))
        zf.writestr("elsewhere/notes.txt", b"not an image")

    body = {"dataset": "nih"}
    r = client.post(
        "/v1/image-checks",
        data={"check": json.dumps(body)},
        files={"file": ("x.zip", buf.getvalue(), "application/zip")},
        headers=op,
    )
    assert r.status_code == 202, r.text
    check_id = r.json()["check_id"]
    assert run_queued(settings) == ["succeeded"]
    c = client.get(f"/v1/image-checks/{check_id}", headers=op).json()
    assert c["state"] == "done"
    assert c["summary"]["images"] == 12 and c["summary"]["flagged"] == 6
    assert c["summary"]["passed"] is False
    report = client.get(f"/v1/image-checks/{check_id}/report", headers=op).json()
    flagged = [im for im in report["images"] if im["flagged"]]
    assert [im["index"] for im in flagged] == list(range(6))
    for im in flagged:
        assert im["neighbours"][0]["dataset_position"] == int(split.train_index[im["index"]])
    page = client.get(f"/v1/image-checks/{check_id}/report.html", headers=op)
    assert page.status_code == 200 and page.text.count("FLAGGED") == 6
    assert client.get(f"/v1/image-checks/{check_id}", headers=auth(keys.partner)).status_code == 403
    # The upload is gone, and an export cannot name a check.
    assert not any((settings.work_dir / "uploads").iterdir())
    r = client.post("/v1/exports", json={"batch_id": check_id, "partner": "partner-a"}, headers=op)
    assert r.status_code == 404


def test_check_needs_a_ready_dataset(client: TestClient, keys: Keys) -> None:
    r = client.post(
        "/v1/image-checks",
        data={"check": json.dumps({"dataset": "nope"})},
        files={"file": ("x.png", b"\x89PNG", "image/png")},
        headers=auth(keys.operator),
    )
    assert r.status_code == 422 and r.json()["field"] == "dataset"
