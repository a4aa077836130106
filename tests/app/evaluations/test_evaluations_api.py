"""Utility evaluations through the REST API on both databases: a real (tiny) run of every
arm stored with its lineage, CSV and chart, shown in the export bundle's README; and the
requests that must be refused."""

from __future__ import annotations

import csv
import io
import json
import math
import zipfile

from conftest import World
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from support import NIH_INGEST, Keys, auth, copy_subset, run_queued

from synthray.app.audit.tables import AuditEvent
from synthray.app.db import session_scope
from synthray.app.registry.summary import choice_caveats
from synthray.app.storage import BlobStore
from synthray.config import Settings

TINY = {"model": "m", "seeds": 2, "steps": 50, "batch_size": 8, "width": 4}
ARMS = ["DS1", "DS2", "DS3", "TSTR", "AUG", "DS2+AUG", "DS2-even", "PRE"]


def _ingest(client: TestClient, keys: Keys, settings: Settings, name: str, **spec: object) -> None:
    assert settings.import_root is not None
    r = client.post(
        "/v1/datasets",
        json={"name": name, "source": name, **NIH_INGEST, **spec},
        headers=auth(keys.operator),
    )
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded"]


def test_evaluation_runs_every_arm_and_is_stored_with_its_lineage(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    op, rev = auth(keys.operator), auth(keys.reviewer)
    r = client.post("/v1/evaluations", json=TINY, headers=op)
    assert r.status_code == 202, r.text
    eid = r.json()["evaluation_id"]
    assert client.get(f"/v1/evaluations/{eid}/chart.png", headers=rev).status_code == 404
    assert run_queued(settings) == ["succeeded"]

    e = client.get(f"/v1/evaluations/{eid}", headers=rev).json()
    assert e["state"] == "done" and e["test_dataset_version_id"] is None
    assert list(e["summary"]["arms"]) == ARMS and e["summary"]["seeds"] == 2
    for arm, fig in e["summary"]["arms"].items():
        for metric in ("accuracy", "balanced_accuracy", "macro_auroc"):
            low, mean, high = fig[metric]["low"], fig[metric]["mean"], fig[metric]["high"]
            assert low <= mean <= high, (arm, metric, fig[metric])
            assert 0.0 <= mean <= 1.0
    assert e["summary"]["arms"]["DS1"]["vs_ds1"]["balanced_accuracy"]["mean"] == 0.0

    result = client.get(f"/v1/evaluations/{eid}/result", headers=rev).json()
    lineage = result["lineage"]
    assert lineage["model_version"]["id"] == trained.train["result"]["model_version_id"]
    assert lineage["classifier"]["steps"] == 50 and lineage["classifier"]["width"] == 4
    assert lineage["test_set"].startswith("held-out patients")
    assert e["code_version"]
    synthetic = result["synthetic"]
    assert synthetic["seed"] == 0 and synthetic["drawn"] >= sum(synthetic["used_per_class"])
    assert synthetic["draws"] >= 1 and sum(synthetic["drawn_per_class"]) == synthetic["drawn"]
    assert sum(synthetic["flagged_per_class"]) == synthetic["flagged"]
    # Drawing and gating are timed apart, and together take no longer than the job.
    assert synthetic["draw_seconds"] > 0 and synthetic["gate_seconds"] > 0
    assert synthetic["draw_seconds"] + synthetic["gate_seconds"] <= result["seconds"] + 0.2
    # Its images were chosen as synthesis chooses a batch's: 1.25 times as many drawn per
    # class (the site's default), the best of each class by the site's choice gated and used.
    assert e["params"]["oversample"] == settings.synthesis_oversample == 1.25
    assert e["params"]["choice"] == settings.synthesis_choice == "realistic"
    assert len(synthetic["selection"]) == synthetic["draws"]
    for selection in synthetic["selection"]:
        assert selection["oversample"] == 1.25 and selection["by"] == "realistic"
        for figures in selection["per_class"].values():
            assert figures["drawn"] == math.ceil(1.25 * figures["kept"])
    gated = sum(s["kept"] for s in synthetic["selection"])
    assert gated == sum(synthetic["drawn_per_class"])
    for drawn, flagged, used in zip(
        synthetic["drawn_per_class"],
        synthetic["flagged_per_class"],
        synthetic["used_per_class"],
        strict=True,
    ):
        assert drawn - flagged >= used
    # The pool the classifiers used, measured in the version's two quality spaces beside
    # the floor of the test images, as the version's own metrics are (same shape).
    pool = synthetic["quality"]
    assert set(pool["spaces"]) == {"supervised", "self_supervised"}
    for space in pool["spaces"].values():
        for side in ("generated", "floor"):
            figures = space["overall"][side]
            assert figures["fid"] >= 0.0 and 0.0 <= figures["precision"] <= 1.0
    assert 0.0 <= pool["class_consistency"]["generated"] <= 1.0
    # Compared in the training images' class mix (the pool is drawn balanced for TSTR),
    # so at most as many as the smaller set holds.
    assert (
        0
        < pool["compared_images"]
        <= min(sum(synthetic["used_per_class"]), result["test_images"], 2000)
    )
    real = result["real_train_per_class"]  # fewer than 2,000: the reference is all of them
    for share, n in zip(pool["class_mix"]["reference"].values(), real, strict=True):
        assert abs(share - n / sum(real)) < 1e-4
    assert e["summary"]["synthetic"]["quality"] == pool
    # The caveat the CLI prints under the pool's figures names the space of the choice.
    (caveat,) = choice_caveats(e["summary"]["synthetic"]["selection"])
    assert "chosen in the self-supervised space" in caveat
    typical = [s | {"by": "typical"} for s in synthetic["selection"]]
    assert "class consistency" in choice_caveats(typical)[0]
    assert choice_caveats([{"oversample": 1.0}]) == []
    assert len(result["scores"]["DS1"]) == 2
    # TSTR trains on as many images as DS1 holds, all synthetic.
    tstr, ds1 = result["scores"]["TSTR"][0], result["scores"]["DS1"][0]
    assert tstr["synthetic_images"] == tstr["train_images"]
    assert abs(tstr["train_images"] - ds1["train_images"]) < 3
    assert ds1["synthetic_images"] == 0

    r = client.get(f"/v1/evaluations/{eid}/result.csv", headers=rev)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {row["arm"] for row in rows} == set(ARMS)
    assert sum(row["seed"] in ("0", "1") for row in rows) == len(ARMS) * 2
    r = client.get(f"/v1/evaluations/{eid}/chart.png", headers=rev)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size[0] >= 600

    listed = client.get("/v1/evaluations", params={"model": "m", "version": 1}, headers=rev)
    assert [x["id"] for x in listed.json()] == [eid]
    assert client.get(f"/v1/evaluations/{eid}", headers=auth(keys.partner)).status_code == 403
    with session_scope(settings.sqlalchemy_url) as s:
        actions = s.scalars(select(AuditEvent.action)).all()
    assert "request_evaluation" in actions

    # Every export bundle of the generator carries the evaluation.
    r = client.post("/v1/synthesize", json={"model": "m", "per_class": 3}, headers=op)
    assert run_queued(settings) == ["succeeded", "succeeded"]
    batch_id = r.json()["batch_id"]
    r = client.post("/v1/exports", json={"batch_id": batch_id, "partner": "partner-a"}, headers=op)
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded"]
    export = client.get(f"/v1/exports/{r.json()['export_id']}", headers=op).json()
    with zipfile.ZipFile(BlobStore(settings.blob_dir).open_verified(export["bundle_sha256"])) as zf:
        readme = zf.read("README.txt").decode()
        manifest = json.loads(zf.read("manifest.json"))
        chart = zf.read("utility/chart.png")
    assert f"Utility (evaluation {eid};" in readme and "TSTR" in readme
    assert manifest["utility_evaluation_id"] == eid
    assert chart == client.get(f"/v1/evaluations/{eid}/chart.png", headers=rev).content


def test_bad_evaluation_requests_are_refused(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    op = auth(keys.operator)

    def refused(body: dict[str, object], field: str) -> None:
        r = client.post("/v1/evaluations", json=body, headers=op)
        assert r.status_code == 422, (body, r.text)
        body_ = r.json()
        if isinstance(body_.get("detail"), list):  # pydantic's field errors
            fields = [d["field"] for d in body_["detail"]]
        else:  # a domain refusal names its field
            fields = [body_.get("field")]
        assert any(f == field or f.startswith(field + ".") for f in fields), (body, body_)

    refused(TINY | {"steps": 10}, "steps")  # a budget too small to mean anything
    refused(TINY | {"seeds": 0}, "seeds")
    refused(TINY | {"arms": ["DS9"]}, "arms")
    refused(TINY | {"model": "nope"}, "model")
    refused(TINY | {"test_dataset": "nih"}, "test_dataset")  # the generator's own data
    assert client.post("/v1/evaluations", json=TINY, headers=auth(keys.partner)).status_code == 403
    assert client.post("/v1/evaluations", json=TINY, headers=auth(keys.reviewer)).status_code == 403

    # A test set with the same patients as the generator's training split.
    assert settings.import_root is not None
    copy_subset(settings.import_root, per_class=4, name="same")
    _ingest(client, keys, settings, "same")
    refused(TINY | {"test_dataset": "same"}, "test_dataset")
    # A test set of other patients but without one of the generator's classes.
    copy_subset(settings.import_root, per_class=4, name="other", skip_first=12)
    _ingest(client, keys, settings, "other", classes=["Normal", "Effusion"])
    refused(TINY | {"test_dataset": "other"}, "test_dataset")
    # Imbalance may only name classes the generator trains on.
    body = {"dataset": "nih", "model_name": "x", "max_steps": 2, "imbalance": {"Hernia": 0.1}}
    r = client.post("/v1/train", json=body, headers=op)
    assert r.status_code == 422 and r.json()["field"] == "imbalance"
    r = client.post("/v1/train", json=body | {"imbalance": {"Normal": 0}}, headers=op)
    assert r.status_code == 422
    # Nothing was queued by any refusal, and nothing half-stored.
    assert run_queued(settings) == []
    listed = client.get("/v1/evaluations", params={"model": "m", "version": 1}, headers=op)
    assert listed.json() == []


def test_an_external_test_set_and_an_induced_imbalance(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    op = auth(keys.operator)
    assert settings.import_root is not None
    copy_subset(settings.import_root, per_class=5, name="site-b", skip_first=12)
    _ingest(client, keys, settings, "site-b")
    body = {
        "dataset": "nih",
        "model_name": "imb",
        "max_steps": 2,
        "batch_size": 4,
        "evaluate": False,
        "imbalance": {"Cardiomegaly": 0.3},
    }
    r = client.post("/v1/train", json=body, headers=op)
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded"]
    v = client.get("/v1/models/imb/versions/1", headers=op).json()
    normal, effusion, cardio = v["config"]["data"]["train_images_per_class"]
    assert cardio < normal and cardio < effusion and cardio >= 1
    r = client.post(
        "/v1/evaluations",
        json=TINY | {"model": "imb", "seeds": 1, "arms": ["DS2", "TSTR"], "test_dataset": "site-b"},
        headers=op,
    )
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded"]
    e = client.get(f"/v1/evaluations/{r.json()['evaluation_id']}", headers=op).json()
    assert list(e["summary"]["arms"]) == ["DS1", "DS2", "TSTR"]  # DS1 always runs
    assert e["test_dataset_version_id"] is not None
    fig = e["summary"]["arms"]["DS2"]["balanced_accuracy"]
    assert fig["low"] is None and fig["high"] is None  # one seed: no interval
    result = client.get(f"/v1/evaluations/{e['id']}/result", headers=op).json()
    assert result["real_train_per_class"] == [normal, effusion, cardio]
    assert result["test_images"] == 15
    assert result["lineage"]["imbalance"] == {"Cardiomegaly": 0.3}
