"""The model registry: immutable versions, aliases with history, archive, compare, and
admin-only weight downloads whose hash is checked."""

from __future__ import annotations

import hashlib
import io
import json

from conftest import World
from fastapi.testclient import TestClient
from PIL import Image
from safetensors import safe_open
from support import Keys, auth, run_queued

from synthray.config import Settings


def test_registry(client: TestClient, keys: Keys, settings: Settings, trained: World) -> None:
    op, rev, adm = auth(keys.operator), auth(keys.reviewer), auth(keys.admin)
    # The world holds m v1 (3 steps); v2 differs in its seed and budget.
    # v2 also guides on part of the path only: the sampler setting reaches its config.
    body = {"dataset": "nih", "model_name": "m", "max_steps": 2, "batch_size": 4, "seed": 2}
    body |= {"guidance_interval": [0.1, 0.6]}
    r = client.post("/v1/train", json=body | {"evaluate": False}, headers=op)
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded"]
    seed_v1 = trained.train["params"]["seed"]

    # Aliases: reviewers move them; every move is recorded with who and when.
    url = "/v1/models/m/aliases/candidate"
    assert client.put(url, json={"version": 1}, headers=op).status_code == 403
    m = client.put(url, json={"version": 1}, headers=rev).json()
    assert m["aliases"] == {"candidate": 1}
    m = client.put(url, json={"version": 2}, headers=rev).json()
    assert m["aliases"] == {"candidate": 2}
    assert (
        client.put("/v1/models/m/aliases/Bad Alias", json={"version": 1}, headers=rev).status_code
        == 422
    )
    assert client.put(url, json={"version": 9}, headers=rev).status_code == 404
    hist = client.get("/v1/models/m/aliases/history", headers=op).json()
    assert [(h["from_version"], h["to_version"], h["moved_by"]) for h in hist] == [
        (None, 1, "reviewer"),
        (1, 2, "reviewer"),
    ]

    # Synthesis by alias uses the version the alias points at.
    r = client.post(
        "/v1/synthesize", json={"model": "m", "alias": "candidate", "per_class": 2}, headers=op
    )
    assert r.status_code == 202
    b = client.get(f"/v1/batches/{r.json()['batch_id']}", headers=op).json()
    v2 = client.get("/v1/models/m/versions/2", headers=op).json()
    assert b["model_version_id"] == v2["id"]
    assert v2["config"]["generator"]["guidance_interval"] == [0.1, 0.6]
    r = client.post(
        "/v1/synthesize", json={"model": "m", "alias": "nope", "per_class": 2}, headers=op
    )
    assert r.status_code == 422 and r.json()["field"] == "alias"

    # Archive: not while aliased; afterwards not usable, still listed for lineage.
    assert client.post("/v1/models/m/versions/2/archive", headers=op).status_code == 409
    r = client.post("/v1/models/m/versions/1/archive", headers=op)
    assert r.status_code == 200 and r.json()["archived"] is True
    r = client.post("/v1/synthesize", json={"model": "m", "version": 1, "per_class": 2}, headers=op)
    assert r.status_code == 422
    assert client.put(url, json={"version": 1}, headers=rev).status_code == 409
    assert len(client.get("/v1/models/m", headers=op).json()["versions"]) == 2

    # Compare: metrics side by side and the config keys that differ (the seed).
    cmp = client.get("/v1/models/m/compare", params={"a": 1, "b": 2}, headers=rev).json()
    assert cmp["metrics"]["steps"] == {"a": 3, "b": 2, "delta": -1}
    assert cmp["config_changes"]["train.seed"] == {"a": seed_v1, "b": 2}

    # Weights: admin only, with the registered hash.
    wurl = "/v1/models/m/versions/2/weights"
    assert client.get(wurl, headers=op).status_code == 403
    r = client.get(wurl, headers=adm)
    assert r.status_code == 200
    assert (
        hashlib.sha256(r.content).hexdigest() == v2["blob_sha256"] == r.headers["x-content-sha256"]
    )
    path = settings.data_dir / "w.safetensors"
    path.write_bytes(r.content)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert "config" in json.dumps(meta)


def test_tampered_generator_is_refused(
    client: TestClient, keys: Keys, settings: Settings, trained: World
) -> None:
    op = auth(keys.operator)
    v = client.get("/v1/models/m/versions/1", headers=op).json()
    blob = settings.blob_dir / v["blob_sha256"][:2] / v["blob_sha256"][2:]
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit pattern inside the tensor data
    blob.write_bytes(bytes(data))
    r = client.post("/v1/synthesize", json={"model": "m", "per_class": 2}, headers=op)
    assert run_queued(settings) == ["failed"]
    job = client.get(f"/v1/jobs/{r.json()['job_id']}", headers=op).json()
    assert "does not match its recorded sha256" in job["error"]
    b = client.get(f"/v1/batches/{r.json()['batch_id']}", headers=op).json()
    assert b["state"] == "failed"
    r = client.get("/v1/models/m/versions/1/weights", headers=auth(keys.admin))
    assert r.status_code == 409 and "integrity" in r.json()["detail"]


def test_gallery_is_staff_only_and_every_view_is_audited(
    client: TestClient, keys: Keys, trained: World
) -> None:
    url = "/v1/models/m/versions/1/gallery.png"
    assert client.get(url, headers=auth(keys.partner)).status_code == 403
    assert client.get(url).status_code == 401
    r = client.get(url, headers=auth(keys.reviewer))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"] == "no-store"
    picture = Image.open(io.BytesIO(r.content))
    # Three classes, each a band with a row of synthetic and a row of real 64 px images.
    assert picture.size[1] == 3 * (14 + 2 * 64 + 3 * 4) and picture.size[0] > 8 * 64
    audit = client.get("/v1/audit", headers=auth(keys.reviewer)).json()
    views = [e for e in audit if e["action"] == "view_gallery"]
    assert len(views) == 1 and views[0]["detail"] == {"version": 1}
    assert (
        client.get("/v1/models/m/versions/7/gallery.png", headers=auth(keys.reviewer)).status_code
        == 404
    )


def test_architecture_settings_are_checked_before_anything_is_queued(
    client: TestClient, keys: Keys, trained: World
) -> None:
    op = auth(keys.operator)
    body = {"dataset": "nih", "model_name": "x", "max_steps": 2}
    for extra, words in [
        ({"lr_d": 1e-3}, "lr_d do not apply to latentflow"),
        ({"architecture": "projgan", "guidance": 2.0}, "guidance do not apply to projgan"),
        ({"architecture": "dcgan", "resolution": 256}, "dcgan supports resolutions [64, 128]"),
        ({"guidance": 50}, "guidance"),
        ({"guidance_interval": [0.9, 0.3]}, "guidance_interval needs t_low < t_high"),
        ({"guidance_interval": [0.3, 1.5]}, "less than or equal to 1"),
        ({"architecture": "projgan", "guidance_interval": [0, 1]}, "do not apply to projgan"),
    ]:
        r = client.post("/v1/train", json=body | extra, headers=op)
        assert r.status_code == 422 and words in r.text, (extra, r.text)
    jobs = client.get("/v1/jobs", headers=op).json()
    assert not [j for j in jobs if (j.get("params") or {}).get("model_name") == "x"]


def test_the_api_knows_every_architecture_the_models_register() -> None:
    from synthray.app.registry.schemas import ARCHITECTURES as API
    from synthray.models.generators.registry import ARCHITECTURES

    assert {name: (a.family, a.resolutions) for name, a in ARCHITECTURES.items()} == API
