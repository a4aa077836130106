"""The whole pipeline through the REST API on both databases, with jobs run by the
worker's own code in this process (the wiring with a real worker process and broker is
tested in tests/e2e)."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pydicom
import pytest
from conftest import World
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from support import NIH_INGEST, Keys, auth, copy_subset, run_queued

from synthray.app.audit.tables import AuditEvent
from synthray.app.batches import service as batches
from synthray.app.batches.tables import SyntheticBatch
from synthray.app.datasets import service as datasets
from synthray.app.datasets.tables import DatasetImage
from synthray.app.db import session_scope
from synthray.app.registry.tables import ModelVersion
from synthray.app.storage import BlobStore
from synthray.config import Settings
from synthray.models.gate import calibration as stored_calibration
from synthray.models.gate.planted import FAMILIES


def _wait_ok(client: TestClient, key: str, job_id: str) -> dict:
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
    assert job["state"] == "succeeded", job
    return job


def test_ingest_skips_bad_rows_and_splits_by_patient(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    result = trained.ingest["result"]
    counts = result["counts"]
    assert counts["images"] == 36
    reasons = {s["item"]: s["reason"] for s in result["skipped"]}
    assert set(reasons.values()) >= {
        "not a readable PNG, JPEG or DICOM file",
        "image data is truncated or corrupt",
        "file not found",
        "file path leaves the source folder",
        "more than one class of the class list",
        "no label in the class list",
    }
    # Reasons name rows, never files or patients.
    assert "passwd" not in json.dumps(result) and "9001" not in json.dumps(result)
    with session_scope(settings.sqlalchemy_url) as s:
        rows = s.scalars(select(DatasetImage)).all()
        train = {r.patient_key for r in rows if r.split == "train"}
        holdout = {r.patient_key for r in rows if r.split == "holdout"}
        assert train and holdout and not (train & holdout)
        # Patient keys are pseudonyms, not the NIH patient ids.
        assert all(len(r.patient_key) == 32 and not r.patient_key.isdigit() for r in rows)
    ds = client.get("/v1/datasets/nih", headers=auth(keys.reviewer)).json()
    assert ds["versions"][0]["state"] == "ready"
    assert ds["versions"][0]["content_sha256"]


def test_bad_ingest_requests(client: TestClient, keys: Keys, settings: Settings) -> None:
    assert settings.import_root is not None
    copy_subset(settings.import_root, per_class=2)
    h = auth(keys.operator)
    base = {"name": "d", "source": "nih", **NIH_INGEST}
    r = client.post("/v1/datasets", json=base | {"source": "../.."}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "source"
    r = client.post("/v1/datasets", json=base | {"source": "nope"}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "source"
    r = client.post("/v1/datasets", json=base | {"patient_column": "Patient Name"}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "patient_column"
    r = client.post("/v1/datasets", json=base | {"classes": ["A", "A"]}, headers=h)
    assert r.status_code == 422
    r = client.post("/v1/datasets", json=base | {"labels_csv": "missing.csv"}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "labels_csv"
    r = client.post("/v1/datasets", json=base, headers=auth(keys.partner))
    assert r.status_code == 403


def test_ingest_with_no_usable_image_fails_with_a_reason(
    client: TestClient, keys: Keys, settings: Settings
) -> None:
    assert settings.import_root is not None
    copy_subset(settings.import_root, per_class=2)
    body = {
        "name": "d",
        "source": "nih",
        **NIH_INGEST,
        "classes": ["Edema", "Hernia"],
        "label_map": {},
    }
    r = client.post("/v1/datasets", json=body, headers=auth(keys.operator))
    assert r.status_code == 202
    assert run_queued(settings) == ["failed"]
    job = client.get(f"/v1/jobs/{r.json()['job_id']}", headers=auth(keys.operator)).json()
    assert job["error"].startswith("no usable image")
    ds = client.get("/v1/datasets/d", headers=auth(keys.operator)).json()
    assert ds["versions"][0]["state"] == "failed"


def test_registry_records_lineage(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    m = client.get("/v1/models/m", headers=auth(keys.reviewer)).json()
    v = m["versions"][0]
    assert v["version"] == 1
    assert v["metrics"]["steps"] == 3
    assert sum(v["metrics"]["phase_steps"].values()) == 3  # by phase (autoencoder, flow)
    assert v["classes"] == ["Normal", "Effusion", "Cardiomegaly"]
    assert len(v["blob_sha256"]) == 64 and v["size_bytes"] > 0
    assert v["train_job_id"] == trained.train["id"]
    assert v["config"]["generator"]["num_classes"] == 3
    q = v["metrics"]["quality"]
    assert set(q["spaces"]) == {"supervised", "self_supervised"}  # two feature spaces
    for space in q["spaces"].values():
        assert set(space["overall"]) == {"generated", "floor"}
        for side in ("generated", "floor"):
            assert set(space["overall"][side]) == {"fid", "kid", "precision", "recall"}
    assert set(q["class_consistency"]) == {"generated", "floor", "per_class"}
    # As many held-out images as generated ones (10 per class), as far as they go in the
    # training images' class mix.
    assert 0 < q["compared_images"] <= min(30, v["metrics"]["holdout_images"])
    assert set(q["class_mix"]["reference"]) == {"Normal", "Effusion", "Cardiomegaly"}
    assert q["samples_per_class"] == {"Normal": 10, "Effusion": 10, "Cardiomegaly": 10}
    # The membership audit attacks with that draw and as many draws again less one.
    assert settings.audit_synthetic_draws == 3
    assert v["metrics"]["privacy_audit"]["synthetic"] == 3 * 30
    assert q["encoder_sha256"] == v["encoder_sha256"] and len(v["encoder_sha256"]) == 64
    assert len(q["ssl_encoder_sha256"]) == 64 and q["ssl_encoder_sha256"] != q["encoder_sha256"]
    # How much training each space's encoder got travels with the figures.
    for training in q["encoder_training"].values():
        assert training["planned_steps"] == 10 and 0 < training["steps"] <= 10
    assert set(q["encoder_training"]) == {"supervised", "self_supervised"}
    # The training job's preview grid: one row per class, 8 samples each.
    r = client.get(f"/v1/jobs/{trained.train['id']}/preview.png", headers=auth(keys.reviewer))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (8 * 64, 3 * 64)


def test_train_on_a_class_subset(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    h = auth(keys.operator)
    body = {
        "dataset": "nih",
        "model_name": "two",
        "max_steps": 2,
        "batch_size": 4,
        "classes": ["Effusion", "Normal"],
        "evaluate": False,
        "precision": "fp32",
    }
    r = client.post("/v1/train", json=body, headers=h)
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded"]
    v = client.get("/v1/models/two/versions/1", headers=h).json()
    assert v["classes"] == ["Normal", "Effusion"]  # in the dataset's order
    assert v["metrics"]["quality"] == {} and v["encoder_sha256"] is None
    assert v["metrics"]["precision"] == "fp32"
    r = client.post("/v1/train", json=body | {"precision": "fp8"}, headers=h)
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["detail"]] == ["precision"]
    r = client.post("/v1/train", json=body | {"classes": ["Normal", "Hernia"]}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "classes"
    # Without its quality classifier the version cannot choose among drawn images: asked
    # to, it says so; by the site's default it keeps every image drawn.
    ask = {"model": "two", "per_class": 2}
    r = client.post("/v1/synthesize", json=ask | {"oversample": 2}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "oversample", r.text
    assert "no quality classifier" in r.json()["detail"]
    assert settings.synthesis_oversample > 1
    r = client.post("/v1/synthesize", json=ask, headers=h)
    assert r.status_code == 202
    assert run_queued(settings) == ["succeeded", "succeeded"]
    batch = client.get(f"/v1/batches/{r.json()['batch_id']}", headers=h).json()
    assert batch["selection"] == {"oversample": 1.0} and batch["check"]["images"] == 4


def test_quality_figures_leave_out_classes_that_synthesis_refuses(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    h = auth(keys.operator)
    v1 = client.get("/v1/models/m/versions/1", headers=h).json()
    counts = v1["config"]["data"]["train_patients_per_class"]
    patients = dict(zip(v1["classes"], counts, strict=True))
    thin = min(patients, key=patients.__getitem__)
    assert sorted(patients.values())[0] < sorted(patients.values())[1], patients
    # The thinnest class falls under the minimum; the others stay above it.
    settings.min_class_patients = patients[thin] + 1
    body = {"dataset": "nih", "model_name": "thin", "max_steps": 2, "batch_size": 4}
    r = client.post("/v1/train", json=body, headers=h)
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded"]
    q = client.get("/v1/models/thin/versions/1", headers=h).json()["metrics"]["quality"]
    assert thin not in q["samples_per_class"] and len(q["samples_per_class"]) == 2
    per_class = q["class_consistency"]["per_class"][thin]
    assert per_class == {"generated": None, "floor": None}
    for space in q["spaces"].values():
        assert thin not in space["per_class"]
    # Its gallery row is still drawn: the picture is as tall as the one of model m, whose
    # three classes are all measured.
    heights = []
    for model in ("thin", "m"):
        r = client.get(f"/v1/models/{model}/versions/1/gallery.png", headers=auth(keys.reviewer))
        assert r.status_code == 200
        heights.append(Image.open(io.BytesIO(r.content)).height)
    assert heights[0] == heights[1]


def test_duplicate_delivery_does_no_second_work(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    from synthray.workers.runner import run

    assert run(trained.train["id"], settings) == "skipped"
    m = client.get("/v1/models/m", headers=auth(keys.reviewer)).json()
    assert len(m["versions"]) == 1


def test_synthesize_check_export_download(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    op, rev = auth(keys.operator), auth(keys.reviewer)
    settings.max_batch_images = 17  # one request may not ask for more images in all
    r = client.post("/v1/synthesize", json={"model": "m", "per_class": 6, "seed": 3}, headers=op)
    assert r.status_code == 422 and "at most 17 images" in r.json()["detail"], r.text
    settings.max_batch_images = 18
    r = client.post("/v1/synthesize", json={"model": "m", "per_class": 6, "seed": 3}, headers=op)
    assert r.status_code == 202, r.text
    batch_id = r.json()["batch_id"]
    # Not checked yet: the gate refuses an export.
    r = client.post("/v1/exports", json={"batch_id": batch_id, "partner": "partner-a"}, headers=op)
    assert r.status_code == 409 and "generated" in r.json()["detail"]
    # The train job's audit calibrated the gate on this dataset's held-out films; the
    # batch's check reads that calibration instead of computing it again.
    calibrations = sorted((settings.cache_dir / "gate").glob("*.safetensors"))
    assert len(calibrations) == 1
    written, before = calibrations[0].stat(), stored_calibration.load(calibrations[0])
    assert stored_calibration.missing(before) == before.params["train"]  # audit: no figures
    assert run_queued(settings) == ["succeeded", "succeeded"]  # synthesize, then check
    assert sorted((settings.cache_dir / "gate").glob("*.safetensors")) == calibrations
    # Read, not computed again (the same held-out scores); the check stored it again with
    # the training-side searches its authenticity figure made (a write renames a new file
    # into place: another inode), which also marks it as used for pruning.
    after = stored_calibration.load(calibrations[0])
    for space, scores in before.holdout_scores.items():
        assert np.array_equal(after.holdout_scores[space], scores)
    assert 0 <= stored_calibration.missing(after) < stored_calibration.missing(before)
    read = calibrations[0].stat()
    assert read.st_ino != written.st_ino and read.st_mtime_ns > written.st_mtime_ns
    batch = client.get(f"/v1/batches/{batch_id}", headers=rev).json()
    assert batch["state"] == "passed", batch
    assert batch["check"]["images"] == 18
    # Drawn 1.25 times over (the site's default), the 6 of 8 per class most like the class's
    # real training films kept (the site's default choice).
    selection = batch["selection"]
    assert (selection["oversample"], selection["drawn"], selection["kept"]) == (1.25, 24, 18)
    assert selection["by"] == settings.synthesis_choice == "realistic"
    assert sorted(selection["per_class"]) == sorted(["Normal", "Effusion", "Cardiomegaly"])
    for figures in selection["per_class"].values():
        assert (figures["drawn"], figures["kept"]) == (8, 6)
        assert figures["mean_log_ratio_kept"] >= figures["mean_log_ratio_drawn"]
        assert figures["lowest_log_ratio_kept"] <= figures["mean_log_ratio_kept"]
    report = client.get(f"/v1/batches/{batch_id}/report", headers=rev).json()
    assert len(report["images"]) == 18
    assert all(len(img["neighbours"]) == 3 for img in report["images"])

    r = client.post("/v1/exports", json={"batch_id": batch_id, "partner": "nobody"}, headers=op)
    assert r.status_code == 422 and r.json()["field"] == "partner"
    r = client.post("/v1/exports", json={"batch_id": batch_id, "partner": "partner-a"}, headers=op)
    assert r.status_code == 202
    export_id = r.json()["export_id"]
    assert run_queued(settings) == ["succeeded"]
    url = f"/v1/exports/{export_id}/download"
    assert client.get(url, headers=auth(keys.partner)).status_code == 409  # not approved
    # Until it is approved, its partner cannot list it or read its hash and size.
    assert client.get("/v1/exports", headers=auth(keys.partner)).json() == []
    assert client.get(f"/v1/exports/{export_id}", headers=auth(keys.partner)).status_code == 404
    assert client.post(f"/v1/exports/{export_id}/approve", headers=op).status_code == 403
    assert client.post(f"/v1/exports/{export_id}/approve", headers=rev).status_code == 200
    assert client.get(url).status_code == 401
    assert client.get(url, headers=auth("sr_0000_guessed")).status_code == 401
    assert client.get(url, headers=auth(keys.other_partner)).status_code == 404
    assert client.get(url, headers=auth(keys.operator)).status_code == 403
    assert client.get("/v1/exports", headers=auth(keys.other_partner)).json() == []
    listed = client.get("/v1/exports", headers=auth(keys.partner)).json()
    assert [e["id"] for e in listed] == [export_id]
    r = client.get(url, headers=auth(keys.partner))
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
        dcm = pydicom.dcmread(io.BytesIO(zf.read(next(n for n in names if n.endswith(".dcm")))))
        card = json.loads(zf.read("privacy.json"))
        scorecard = zf.read("PRIVACY.md").decode()
    assert manifest["exported_per_class"] == {"Normal": 6, "Effusion": 6, "Cardiomegaly": 6}
    assert manifest["provenance"]["selection"] == selection == card["selection"]
    assert "chosen from 24 drawn (oversample 1.25): per class, those most like" in scorecard
    assert "(no image is ranked for being near one film). Every" in scorecard
    assert "memorization_report.json" in names
    # The privacy scorecard: the batch's gate figures and the generator's audit, in words
    # and as JSON, both listed with their hashes.
    assert {"PRIVACY.md", "privacy.json"} <= {f["path"] for f in manifest["files"]}
    assert card["gate"]["checked"] == 18 and card["gate"]["exported"] == 18
    assert card["gate"]["removed"] == 0 and card["patient_split"]["holdout_patients"] >= 1
    assert card["deidentification"]["patient_identity_removed"] == "YES"
    attacks = {(a["attack"], a["space"]) for a in card["membership_inference"]["attacks"]}
    assert attacks == {
        ("nearest-synthetic", "pixel"),
        ("nearest-synthetic", "copy-detection"),
        ("nearest-synthetic", "supervised encoder"),
        ("nearest-synthetic", "self-supervised encoder"),
        ("reconstruction", "generator"),
        ("flow-loss", "generator"),
    }
    assert "## Membership inference" in scorecard and "| flow-loss | generator |" in scorecard
    # Patients are the unit: one film each, and a verdict that says when there are too few.
    mi = card["membership_inference"]
    assert mi["unit"] == "patient (one film each)"
    assert mi["members"] == mi["nonmembers"] <= mi["holdout_patients"]
    assert 0 < mi["control_nonmembers"] <= mi["nonmembers"] // 2
    # Each nearest-synthetic attack again with real films of non-member training patients
    # in place of the synthetic images, in the table's last column.
    # As many as the synthetic images where the site has them, one film a patient first.
    assert 0 < mi["space_control_patients"] <= mi["train_patients"] - mi["members"]
    assert mi["space_control_patients"] <= mi["space_control_films"] <= mi["synthetic"]
    for a in mi["attacks"]:
        assert ("space_control" in a) is (a["attack"] == "nearest-synthetic")
        # The three draws' worth of images, each draw alone as well.
        nearest = a["attack"] == "nearest-synthetic"
        assert len(a.get("auroc_by_draw", [])) == (3 if nearest else 0)
    assert mi["synthetic_draws"] == 3
    assert f"{mi['synthetic']} synthetic images are 3 draws alike" in scorecard
    assert "| space control AUROC |" in scorecard
    stand_ins = f"{mi['space_control_films']} real films of {mi['space_control_patients']} training"
    assert stand_ins in scorecard
    assert f"{mi['members']} training patients (members)" in scorecard
    assert mi["conclusive"] is (mi["nonmembers"] >= 100)
    assert ("inconclusive:" in scorecard) is not mi["conclusive"]
    # What chance alone gives the worst attack at these group sizes, and the p-value.
    chance = card["membership_inference"]["worst_tpr_by_chance"]
    assert chance["rounds"] == 1000 and chance["median"] <= chance["p95"] <= 1.0
    assert 0.0 < chance["p_value"] <= 1.0
    assert f"p = {chance['p_value']:.3f} against chance" in scorecard
    assert "## Re-identification" in scorecard  # measured, or said to be unmeasured
    # The gate's detection of planted copies of this dataset's own training films: every
    # family, two copies each (the test settings); an exact copy is always caught.
    planted = card["planted_copy_detection"]
    assert list(planted["per_family"]) == list(FAMILIES) and planted["planted"] == 24
    assert planted["per_family"]["exact"] == {"planted": 2, "caught": 2, "rate": 1.0}
    assert sum(f["caught"] for f in planted["per_family"].values()) == planted["caught"]
    lo, hi = planted["interval_95"]
    assert lo <= planted["rate"] <= hi
    assert "## Does the gate catch altered copies?" in scorecard
    assert f"It caught {planted['caught']} of 24" in scorecard and "| combined |" in scorecard
    assert not any("planted" in x for x in card["not_measured"])
    assert sum(n.endswith(".png") for n in names) == 18
    assert dcm.ConversionType == "SYN" and "SYNTHETIC" in dcm.ImageType
    assert dcm.preamble == b"\x00" * 128
    with session_scope(settings.sqlalchemy_url) as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "download_export")).all()
        outcomes = sorted(e.outcome for e in events)
        anonymous = [(e.actor_name, e.detail["reason"]) for e in events if e.actor_key_id is None]
    # not approved, no key, a guessed key, another partner, the wrong role; then the download
    assert outcomes == ["ok"] + ["refused"] * 5
    assert anonymous == [(None, "no valid API key")] * 2


def test_gate_blocks_memorized_and_changed_batches(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    """Training images planted as a 'synthetic' batch are flagged and the export refused."""
    blobs = BlobStore(settings.blob_dir)
    op = auth(keys.operator)
    with session_scope(settings.sqlalchemy_url) as s:
        mv_id = trained.train["result"]["model_version_id"]
        dv = client.get("/v1/datasets/nih", headers=op).json()["versions"][0]
        split = datasets.load_split(s, blobs, dv["id"])
        images = split.train_images[:10]
        labels = split.train_labels[:10]
        blob, _ = blobs.put_arrays(images=images, labels=labels)
        b = SyntheticBatch(model_version_id=mv_id, counts={}, seed=0)
        s.add(b)
        s.flush()
        batch_id = b.id
        batches.record_samples(s, settings, batch_id, blob, None, {"oversample": 1.0})
    assert run_queued(settings) == ["succeeded"]
    batch = client.get(f"/v1/batches/{batch_id}", headers=op).json()
    assert batch["state"] == "failed"
    assert batch["check"]["flagged"] == 10
    # /metrics sums the flagged images of every checked batch in the database.
    with session_scope(settings.sqlalchemy_url) as s:
        checked = s.scalars(
            select(SyntheticBatch).where(SyntheticBatch.state.in_(("passed", "failed")))
        ).all()
        expected = sum(int(b.check.get("flagged", 0)) for b in checked)
    scraped = [
        line
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("synthray_gate_flagged_images ")
    ]
    assert expected >= 10 and scraped == [f"synthray_gate_flagged_images {float(expected)}"]
    report = client.get(f"/v1/batches/{batch_id}/report", headers=op).json()
    for i, img in enumerate(report["images"]):
        assert img["neighbours"][0]["dataset_position"] == int(split.train_index[i])
        assert img["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    page = client.get(f"/v1/batches/{batch_id}/report.html", headers=auth(keys.reviewer))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"  # it shows real training images
    assert page.text.count("FLAGGED") == 10
    assert page.text.count("data:image/png;base64,") == 10 * 4  # each beside 3 neighbours
    assert (
        client.get(f"/v1/batches/{batch_id}/report.html", headers=auth(keys.partner)).status_code
        == 403
    )
    r = client.post("/v1/exports", json={"batch_id": batch_id, "partner": "partner-a"}, headers=op)
    assert r.status_code == 409 and "failed the memorization check" in r.json()["detail"]
    r = client.post(
        "/v1/exports", json={"batch_id": batch_id, "partner": "partner-a"}, headers=auth(keys.admin)
    )
    assert r.status_code == 409

    # A passed batch whose images were replaced after the check cannot be exported.
    with session_scope(settings.sqlalchemy_url) as s:
        row = s.get(SyntheticBatch, batch_id)
        assert row is not None
        row.state = "passed"
        other, _ = blobs.put_arrays(images=np.zeros_like(images), labels=labels)
        row.images_blob = other
    r = client.post("/v1/exports", json={"batch_id": batch_id, "partner": "partner-a"}, headers=op)
    assert r.status_code == 409 and "changed after its check" in r.json()["detail"]


def test_synthesis_refuses_classes_with_too_few_training_patients(
    keys: Keys, settings: Settings, trained: World
) -> None:
    from synthray.app.main import create_app

    strict = settings.model_copy(update={"min_class_patients": 10_000})
    with TestClient(create_app(strict), raise_server_exceptions=False) as c:
        h = auth(keys.operator)
        v = c.get("/v1/models/m/versions/1", headers=h).json()
        patients = v["config"]["data"]["train_patients_per_class"]
        assert len(patients) == 3 and all(n >= 1 for n in patients)
        r = c.post("/v1/synthesize", json={"model": "m", "per_class": 2}, headers=h)
        assert r.status_code == 422 and r.json()["field"] == "counts"
        assert "too few training patients to synthesize Normal (" in r.json()["detail"]
        r = c.post(
            "/v1/synthesize", json={"model": "m", "counts": {"Normal": 0, "Effusion": 2}}, headers=h
        )
        assert r.status_code == 422 and "Effusion" in r.json()["detail"]
        assert "Normal" not in r.json()["detail"]  # not asked for, not refused
        assert c.get("/v1/batches", headers=h).json() == []  # nothing was queued
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.post(
            "/v1/synthesize", json={"model": "m", "per_class": 2}, headers=auth(keys.operator)
        )
        assert r.status_code == 202


def test_a_site_can_require_a_passed_membership_audit_before_export(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    op = auth(keys.operator)
    r = client.get("/v1/models/m/versions/1", headers=op).json()
    audit = r["metrics"]["privacy_audit"]
    assert audit["members"] >= 1 and len(audit["attacks"]) == 6
    for a in audit["attacks"]:
        assert 0.0 <= a["auroc"] <= 1.0 and 0.0 <= a["control"]["auroc"] <= 1.0
    r = client.post("/v1/synthesize", json={"model": "m", "per_class": 2, "seed": 5}, headers=op)
    batch_id = r.json()["batch_id"]
    assert run_queued(settings) == ["succeeded", "succeeded"]
    settings.export_requires_passed_audit = True

    def set_audit(value: dict | None) -> None:
        with session_scope(settings.sqlalchemy_url) as s:
            mv = s.scalars(select(ModelVersion)).one()
            mv.metrics = mv.metrics | {"privacy_audit": value}

    body = {"batch_id": batch_id, "partner": "partner-a"}
    set_audit(None)
    r = client.post("/v1/exports", json=body, headers=op)
    assert r.status_code == 409 and "no membership-inference audit" in r.json()["detail"]
    set_audit(audit | {"passed": False, "worst_auroc": 0.91})
    r = client.post("/v1/exports", json=body, headers=op)
    assert r.status_code == 409 and "worst AUROC 0.91" in r.json()["detail"]
    set_audit(
        audit | {"passed": False, "conclusive": False, "nonmembers": 12, "min_nonmembers": 100}
    )
    r = client.post("/v1/exports", json=body, headers=op)
    assert r.status_code == 409 and "inconclusive: 12 non-member patients" in r.json()["detail"]
    set_audit(audit | {"passed": True})
    r = client.post("/v1/exports", json=body, headers=op)
    assert r.status_code == 202, r.text
    # The build job checks again: an audit that fails meanwhile stops the bundle.
    set_audit(audit | {"passed": False})
    assert run_queued(settings) == ["failed"]
    settings.export_requires_passed_audit = False
    assert client.post("/v1/exports", json=body, headers=op).status_code == 202
    assert run_queued(settings) == ["succeeded"]
