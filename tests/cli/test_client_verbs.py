"""The client verbs as a user runs them (real subprocesses) against the real API.

One SynthRay API per module: ``create_app`` served over HTTP by uvicorn in a thread on
a free port, with a SQLite database built by the migrations and an ingested slice of
the NIH reference set. No worker runs: a job stays queued until a test runs it in this
process with ``support.run_queued`` (the worker's own claim, lease and handler code),
which is how a verb that waits for its job (``check-images``) gets its answer.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from support import NIH_INGEST, Keys, auth, copy_subset, make_keys, nih_dir, run_queued, served

from synthray.app.datasets import service as datasets
from synthray.app.db import session_scope
from synthray.app.storage import BlobStore
from synthray.config import Settings
from synthray.migrations import upgrade

DEPRECATION = (
    "warning: 'synthray check' is deprecated and will be removed in the next release; "
    "use 'synthray check-images'"
)


@dataclass
class Api:
    url: str
    settings: Settings
    keys: Keys
    ingest_job: str

    def get(self, path: str, key: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}/v1{path}", params=params, headers=auth(key), timeout=30)
        assert r.status_code == 200, r.text
        return r.json() if r.headers["content-type"].startswith("application/json") else r.text


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("cli-api")
    import_root = tmp / "import"
    import_root.mkdir()
    settings = Settings(
        dev_mode=True,
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp}/db.sqlite",
        broker_url="embedded",
        import_root=import_root,
        quality_encoder_steps=10,
        quality_samples_per_class=10,
        copydetect_seconds=2,
        copydetect_steps=4,
        max_dcr_train_share=1.0,
        min_class_patients=1,
    )
    upgrade(settings.sqlalchemy_url)
    keys = make_keys(settings)
    copy_subset(import_root, per_class=6)

    with served(settings) as url:
        r = httpx.post(
            f"{url}/v1/datasets",
            json={"name": "nih", "source": "nih", **NIH_INGEST},
            headers=auth(keys.operator),
            timeout=30,
        )
        assert r.status_code == 202, r.text
        assert run_queued(settings) == ["succeeded"]
        yield Api(url, settings, keys, r.json()["job_id"])


@pytest.fixture(scope="module")
def model(api: Api) -> str:
    """A registered model version ``chest`` v1: two training steps, no evaluation."""
    body = {
        "dataset": "nih",
        "model_name": "chest",
        "max_steps": 2,
        "batch_size": 4,
        "evaluate": False,
    }
    r = httpx.post(f"{api.url}/v1/train", json=body, headers=auth(api.keys.operator), timeout=30)
    assert r.status_code == 202, r.text
    assert run_queued(api.settings) == ["succeeded"]
    return "chest"


def _env(env: dict[str, str] | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in {"SYNTHRAY_URL", "SYNTHRAY_API_KEY"}}
    return base | {"COLUMNS": "200"} | (env or {})


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "synthray.cli.main", *args],
        env=_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_cli_working(
    api: Api, args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a verb that waits for its job, running the queued jobs here (the worker's
    part) until the CLI process ends."""
    out, err = cwd / f".{args[0]}.out", cwd / f".{args[0]}.err"
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "synthray.cli.main", *args],
            env=_env(env),
            cwd=cwd,
            stdout=fo,
            stderr=fe,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None:
                assert time.monotonic() < deadline, "the CLI did not finish"
                if not run_queued(api.settings):
                    time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())


def _png(pixels: np.ndarray, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").save(dest, format="PNG")


def _images(api: Api, tmp_path: Path) -> Path:
    """A folder with a subfolder: ``a.png`` is an NIH radiograph of a patient outside the
    dataset; ``sub/b.png`` and ``sub/c.png`` are two of the dataset's training images."""
    folder = tmp_path / "images"
    assert api.settings.import_root is not None
    with (api.settings.import_root / "nih" / "labels.csv").open(newline="") as f:
        ingested = {r["Patient ID"] for r in csv.DictReader(f)}
    with (nih_dir() / "labels.csv").open(newline="") as f:
        outsider = next(r for r in csv.DictReader(f) if r["Patient ID"] not in ingested)
    folder.mkdir()
    shutil.copyfile(nih_dir() / outsider["file"], folder / "a.png")
    version_id = api.get("/datasets/nih", api.keys.operator)["versions"][0]["id"]
    with session_scope(api.settings.sqlalchemy_url) as s:
        split = datasets.load_split(s, BlobStore(api.settings.blob_dir), version_id)
    _png(split.train_images[0], folder / "sub" / "b.png")
    _png(split.train_images[1], folder / "sub" / "c.png")
    return folder


def _imagecheck_jobs(api: Api) -> list[str]:
    jobs = api.get("/jobs", api.keys.operator, kind="imagecheck", limit=500)
    return [j["id"] for j in jobs]


@dataclass
class Checked:
    cwd: Path
    folder: Path
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def checked(api: Api, tmp_path_factory: pytest.TempPathFactory) -> Checked:
    """``synthray check-images`` run once, with the key and URL from the environment."""
    cwd = tmp_path_factory.mktemp("check-images")
    folder = _images(api, cwd)
    env = {"SYNTHRAY_URL": api.url, "SYNTHRAY_API_KEY": api.keys.operator}
    args = ["--dataset", "nih", "--images", str(folder), "--html", "e.html"]
    return Checked(cwd, folder, run_cli_working(api, ["check-images", *args], cwd, env))


def test_check_images_uploads_the_folder_and_prints_the_result(api: Api, checked: Checked) -> None:
    r = checked.result
    assert r.returncode == 0, r.stderr
    assert "deprecated" not in r.stderr
    printed = json.loads(r.stdout)
    check_id = printed["id"]
    assert printed == api.get(f"/image-checks/{check_id}", api.keys.operator)
    assert printed["state"] == "done"
    job = api.get(f"/jobs/{printed['job_id']}", api.keys.operator)
    assert (job["kind"], job["state"]) == ("imagecheck", "succeeded")
    # All three files arrived, the subfolder's in order after the top folder's.
    assert printed["summary"]["images"] == 3
    report = api.get(f"/image-checks/{check_id}/report", api.keys.operator)
    flagged = {im["index"] for im in report["images"] if im["flagged"]}
    assert {1, 2} <= flagged  # the two training images are caught as copies
    assert printed["summary"]["flagged"] == len(flagged)
    page = (checked.cwd / "e.html").read_text()
    assert page == api.get(f"/image-checks/{check_id}/report.html", api.keys.operator)
    assert page.count("FLAGGED") == len(flagged)
    assert "evidence page written to e.html" in r.stderr
    # The key from the environment made the request.
    events = api.get("/audit", api.keys.reviewer, object_type="image_check")
    requested = [
        e["actor_name"]
        for e in events
        if e["action"] == "request_image_check" and e["object_id"] == str(check_id)
    ]
    assert requested == ["operator"]


def test_check_is_a_hidden_alias_that_warns(api: Api, checked: Checked) -> None:
    env = {"SYNTHRAY_URL": api.url, "SYNTHRAY_API_KEY": api.keys.operator}
    before = _imagecheck_jobs(api)
    old = run_cli_working(
        api, ["check", "--dataset", "nih", "--images", str(checked.folder)], checked.cwd, env
    )
    assert old.returncode == 0, old.stderr
    # It ran one image check of its own, with the same outcome as check-images.
    assert len(_imagecheck_jobs(api)) == len(before) + 1
    a, b = json.loads(checked.result.stdout), json.loads(old.stdout)
    assert b["id"] != a["id"] and b["job_id"] not in before
    same = ("state", "dataset_version_id", "resolution", "summary")
    assert {k: b[k] for k in same} == {k: a[k] for k in same}
    assert b["state"] == "done" and b["summary"]["images"] == 3

    warning = [line for line in old.stderr.splitlines() if "deprecated" in line]
    assert warning == [DEPRECATION]
    assert old.stderr.index("deprecated") < old.stderr.index("imagecheck")  # before the work

    listing = run_cli(["--help"], checked.cwd)
    first_words = {line.strip("│| ").split(" ")[0] for line in listing.stdout.splitlines()}
    assert "check-images" in first_words
    assert "check" not in first_words


def test_check_alias_keeps_the_verbs_own_errors(tmp_path: Path) -> None:
    r = run_cli(["check", "--dataset", "nih", "--images", str(tmp_path / "none")], tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == DEPRECATION
    assert "does not exist" in " ".join(r.stderr.split())


def test_connection_options_win_over_the_environment(api: Api, tmp_path: Path) -> None:
    # The environment names a closed port and a partner's key (which may not list jobs).
    env = {"SYNTHRAY_URL": "http://127.0.0.1:9", "SYNTHRAY_API_KEY": api.keys.partner}
    flags = ["--url", api.url, "--api-key", api.keys.operator]
    r = run_cli(["jobs", "list", *flags], tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert api.ingest_job[:8] in r.stdout and "ingest" in r.stdout
    # The environment alone is used when no flag is given: the partner key is refused.
    r = run_cli(["jobs", "list", "--url", api.url], tmp_path, env)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error (403): this action needs role:")


def test_no_key_is_refused_in_one_line(api: Api, tmp_path: Path) -> None:
    r = run_cli(["jobs", "show", api.ingest_job, "--url", api.url], tmp_path)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "error (401): missing API key (Authorization: Bearer <key> or X-API-Key)"
    ]
    assert "Traceback" not in r.stderr
    # With a key, the same call answers.
    r = run_cli(
        ["jobs", "show", api.ingest_job, "--url", api.url, "--api-key", api.keys.operator],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert (job["id"], job["kind"], job["state"]) == (api.ingest_job, "ingest", "succeeded")


def test_api_errors_are_one_line_and_exit_1(api: Api, tmp_path: Path) -> None:
    env = {"SYNTHRAY_URL": api.url, "SYNTHRAY_API_KEY": api.keys.operator}
    r = run_cli(["jobs", "cancel", "nope"], tmp_path, env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error (404): job nope not found"]
    assert "Traceback" not in r.stderr
    r = run_cli(["jobs", "retry", api.ingest_job], tmp_path, env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error (409): job {api.ingest_job} is succeeded: only a failed or cancelled job is retried"
    ]
    r = run_cli(["jobs", "list"], tmp_path, env | {"SYNTHRAY_API_KEY": "sr_not_a_key"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error (401): invalid or revoked API key"]


def test_put_and_download(api: Api, model: str, tmp_path: Path) -> None:
    env = {"SYNTHRAY_URL": api.url, "SYNTHRAY_API_KEY": api.keys.reviewer}
    r = run_cli(["models", "alias", model, "prod", "1"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert (printed["name"], printed["aliases"]) == (model, {"prod": 1})
    assert api.get(f"/models/{model}", api.keys.operator)["aliases"] == {"prod": 1}
    moves = api.get(f"/models/{model}/aliases/history", api.keys.operator)
    assert [(m["to_version"], m["moved_by"]) for m in moves] == [(1, "reviewer")]

    # Weights are for admins: an operator's download fails and leaves no file behind.
    op = env | {"SYNTHRAY_API_KEY": api.keys.operator}
    r = run_cli(["models", "weights", model, "1", "--dest", "w/g.st"], tmp_path, op)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error (403):")
    assert not (tmp_path / "w" / "g.st").exists()
    assert not (tmp_path / "w" / "g.st.part").exists()

    admin = env | {"SYNTHRAY_API_KEY": api.keys.admin}
    r = run_cli(["models", "weights", model, "1", "--dest", "w/g.st"], tmp_path, admin)
    assert r.returncode == 0, r.stderr
    version = api.get(f"/models/{model}/versions/1", api.keys.operator)
    data = (tmp_path / "w" / "g.st").read_bytes()
    assert len(data) == version["size_bytes"] > 0
    assert hashlib.sha256(data).hexdigest() == version["blob_sha256"]
    assert not (tmp_path / "w" / "g.st.part").exists()
    assert f"({len(data)} bytes)" in r.stderr


def test_client_verbs_document_their_connection(tmp_path: Path) -> None:
    r = run_cli(["check-images", "--help"], tmp_path, {"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    for text in ("--url", "--api-key", "SYNTHRAY_URL", "SYNTHRAY_API_KEY", "127.0.0.1:8000"):
        assert text in r.stdout


def test_train_guidance_interval_is_checked_locally_then_by_the_api(
    api: Api, tmp_path: Path
) -> None:
    env = {"SYNTHRAY_URL": api.url, "SYNTHRAY_API_KEY": api.keys.operator}
    base = ["train", "nih", "--model-name", "gi", "--max-steps", "1", "--no-wait"]
    r = run_cli([*base, "--guidance-interval", "half"], tmp_path, env)
    assert r.returncode == 2 and "expected T_LOW:T_HIGH" in r.stderr, r.stderr
    r = run_cli([*base, "--guidance-interval", "0.8:0.2"], tmp_path, env)
    assert r.returncode == 1, r.stderr
    assert "guidance_interval needs t_low < t_high" in r.stderr and "Traceback" not in r.stderr
