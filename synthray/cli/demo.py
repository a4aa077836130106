"""``synthray demo``: the whole pipeline on the embedded default, through the REST API.

It starts a real API server and a real worker process (SQLite file, serverless
broker), then ingests, trains, synthesizes, runs the memorization gate, exports,
approves and downloads as a partner, exactly as separate users would.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from synthray.app.batches.schemas import CHOSEN_BY
from synthray.app.registry.summary import audit_line, planted_line, quality_lines
from synthray.cli.client import ApiError, Client

NIH_CLASSES = ["Normal", "Cardiomegaly", "Effusion", "Edema", "Pneumothorax"]


def ingest_body(folder: Path) -> dict[str, Any]:
    """Column mapping for the two reference layouts, else file,label,patient_id."""
    with (folder / "labels.csv").open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    base: dict[str, Any] = {"name": folder.name, "source": folder.name, "resolutions": [64]}
    if "Finding Labels" in header and "Patient ID" in header:
        return base | {
            "file_column": "file",
            "label_column": "Finding Labels",
            "label_separator": "|",
            "label_map": {"No Finding": "Normal"},
            "patient_column": "Patient ID",
            "classes": NIH_CLASSES,
            "view_column": "View Position",
            "sex_column": "Patient Gender",
            "age_column": "Patient Age",
        }
    patient = "patient_key" if "patient_key" in header else "patient_id"
    classes = sorted({r.get("label", "") for r in rows if r.get("label")})
    return base | {
        "file_column": "file",
        "label_column": "label",
        "patient_column": patient,
        "classes": classes,
    }


def synthesis_counts(
    version: dict[str, Any], per_class: int, minimum: int
) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """Images per class for the classes with at least ``minimum`` training patients, and
    the (class, patients) left out."""
    patients = (version["config"].get("data") or {}).get("train_patients_per_class")
    patients = patients or [minimum] * len(version["classes"])
    counts = {
        c: per_class for c, n in zip(version["classes"], patients, strict=True) if n >= minimum
    }
    thin = [(c, n) for c, n in zip(version["classes"], patients, strict=True) if n < minimum]
    return counts, thin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a SynthRay process exited during start-up")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the API did not become ready in time")


def run_demo(
    data: Path | None,
    train_seconds: float,
    train_steps: int | None,
    per_class: int,
    workdir: Path | None,
    out: Console,
    err: Console,
) -> int:
    t0 = time.monotonic()
    folder = Path(data or os.environ.get("SYNTHRAY_DEMO_DATA", "../shared/data/nih-cxr14-64"))
    folder = folder.expanduser().resolve()
    if not (folder / "labels.csv").is_file():
        err.print(
            f"No labelled images at {folder}: point --data or SYNTHRAY_DEMO_DATA at a folder "
            "of PNG/JPEG radiographs with a labels.csv (columns file,label,patient_id)."
        )
        return 2
    work = (workdir or Path("var") / "demo" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    for k in ("SYNTHRAY_DATABASE_URL", "SYNTHRAY_BROKER_URL"):
        env.pop(k, None)
    env |= {
        "SYNTHRAY_DATA_DIR": str(work),
        "SYNTHRAY_IMPORT_ROOT": str(folder.parent),
        "PYTHONUNBUFFERED": "1",
    }
    # The demo's copy-detection embedding gets a fifth of the default's minutes, so that the
    # whole pipeline fits its 10 minutes on 2 CPU cores; a caller's setting wins.
    env.setdefault("SYNTHRAY_COPYDETECT_SECONDS", "60")
    if "SYNTHRAY_SECRET_KEY" not in env:
        env["SYNTHRAY_DEV_MODE"] = "true"  # the demo is a development run by definition

    from synthray.app.auth.schemas import Role
    from synthray.app.auth.service import create_key
    from synthray.app.db import session_scope
    from synthray.config import Settings
    from synthray.migrations import upgrade

    # The same settings the child processes get from ``env`` (explicit values win over
    # any SYNTHRAY_* variable of the caller's environment).
    settings = Settings(
        data_dir=work,
        import_root=folder.parent,
        database_url=None,
        broker_url="embedded",
        dev_mode=env.get("SYNTHRAY_DEV_MODE", "").lower() in {"1", "true", "yes"},
    )
    err.print(f"[bold]SynthRay demo[/bold]: data {folder}, state in {work}")
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as s:
        keys = {
            name: create_key(s, settings.secret_key, name, role).key
            for name, role in [
                ("demo-operator", Role.operator),
                ("demo-reviewer", Role.reviewer),
                ("partner-a", Role.partner),
                ("partner-b", Role.partner),
            ]
        }
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    logs = (work / "api.log").open("wb"), (work / "worker.log").open("wb")
    cli = [sys.executable, "-m", "synthray.cli.main"]
    api = subprocess.Popen(
        [*cli, "serve", "--port", str(port), "--no-with-worker"],
        env=env,
        stdout=logs[0],
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        [*cli, "worker", "--queues", "gpu,cpu"], env=env, stdout=logs[1], stderr=subprocess.STDOUT
    )
    try:
        _wait_ready(url, [api, worker])
        return _pipeline(
            url,
            keys,
            folder,
            train_seconds,
            train_steps,
            per_class,
            settings.min_class_patients,
            work,
            t0,
            out,
            err,
        )
    except (ApiError, RuntimeError) as exc:
        err.print(f"[red]demo failed:[/red] {exc} (logs in {work})")
        return 1
    finally:
        for p in (api, worker):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (api, worker):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()


def _require(job: dict[str, Any], what: str) -> dict[str, Any]:
    if job["state"] != "succeeded":
        raise RuntimeError(f"{what} job {job['state']}: {job.get('error')}")
    return job


def _pipeline(
    url: str,
    keys: dict[str, str],
    folder: Path,
    train_seconds: float,
    train_steps: int | None,
    per_class: int,
    min_patients: int,
    work: Path,
    t0: float,
    out: Console,
    err: Console,
) -> int:
    op = Client(url, keys["demo-operator"])
    rev = Client(url, keys["demo-reviewer"])
    partner = Client(url, keys["partner-a"])
    other = Client(url, keys["partner-b"])
    anonymous = Client(url, None)

    body = ingest_body(folder)
    acc = op.post("/datasets", body)
    job = _require(op.wait(acc["job_id"], err, "ingest    "), "ingest")
    counts = job["result"]["counts"]
    err.print(
        f"  {counts['images']} images from {counts['patients']} patients kept "
        f"({counts['holdout_patients']} patients held out), {counts['skipped']} rows skipped"
    )

    acc = op.post(
        "/train",
        {
            "dataset": body["name"],
            "model_name": "demo-generator",
            "max_seconds": train_seconds,
            "max_steps": train_steps,
            "checkpoint_every_s": 30,
        },
    )
    job = _require(op.wait(acc["job_id"], err, "train     "), "train")
    m = job["result"]["metrics"]
    version = job["result"]["version"]
    err.print(
        f"  {m['steps']} steps, {m['images_per_second']:.0f} img/s on {m['device']} "
        f"({m['precision']}); registered demo-generator v{version}"
    )
    quality = quality_lines(m.get("quality") or {})
    for line in quality:
        err.print(f"  {line}")
    membership = audit_line(m.get("privacy_audit"))
    if membership:
        err.print(f"  membership inference: {membership}")
    planted = planted_line(m.get("privacy_audit"))
    if planted:
        err.print(f"  memorization gate: {planted}")
    gallery = work / "gallery.png"
    rev.download(f"/models/demo-generator/versions/{version}/gallery.png", gallery)
    err.print(f"  gallery (synthetic beside real held-out images, per class): {gallery}")

    # Classes with too few training patients cannot be synthesized without reproducing
    # them (the API refuses them); the demo asks for the others and says so.
    mv = op.get(f"/models/demo-generator/versions/{version}")
    counts, thin = synthesis_counts(mv, per_class, min_patients)
    for name, n in thin:
        err.print(
            f"  [yellow]{name} is left out[/yellow]: {n} training patient(s), fewer than "
            f"{min_patients}; its synthetic images could only copy them"
        )
    acc = op.post("/synthesize", {"model": "demo-generator", "counts": counts, "seed": 1})
    job = _require(op.wait(acc["job_id"], err, "synthesize"), "synthesize")
    _require(op.wait(job["result"]["check_job_id"], err, "check     "), "check")
    batch = op.get(f"/batches/{acc['batch_id']}")
    chk, chosen = batch["check"], batch["selection"]
    if chosen.get("drawn"):
        how = CHOSEN_BY.get(chosen.get("by", "typical"), "")
        err.print(f"  synthesis: {chosen['kept']} of {chosen['drawn']} images drawn kept, {how}")
    err.print(
        f"  gate: {chk['flagged']} of {chk['images']} images flagged "
        f"(threshold {chk['threshold']:.4f}), batch {batch['state']}"
    )
    if batch["state"] != "passed":
        err.print("[yellow]the memorization gate failed this batch; nothing is exported[/yellow]")
        return 3

    acc = op.post("/exports", {"batch_id": batch["id"], "partner": "partner-a"})
    _require(op.wait(acc["job_id"], err, "export    "), "export")
    export_id = acc["export_id"]
    rev.post(f"/exports/{export_id}/approve")

    refusals = {}
    for who, c in (("no key", anonymous), ("partner-b", other)):
        try:
            c.download(f"/exports/{export_id}/download", work / "refused.zip")
            refusals[who] = "DOWNLOADED (unexpected)"
        except ApiError as exc:
            refusals[who] = f"refused ({exc.status})"
    bundle = work / f"synthray-export-{export_id}.zip"
    size = partner.download(f"/exports/{export_id}/download", bundle)
    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    wall = time.monotonic() - t0

    t = Table(title="SynthRay demo", show_header=False)
    t.add_row("bundle", f"{bundle} ({size / 1e6:.1f} MB)")
    for c, n in manifest["exported_per_class"].items():
        t.add_row(f"images: {c}", str(n))
    t.add_row("gallery: synthetic beside real", str(gallery))
    for line in quality:
        name, _, value = line.partition(": ")
        t.add_row(name, value)
    if membership:
        t.add_row("membership inference (PRIVACY.md)", membership)
    if planted:
        t.add_row("gate on planted copies (PRIVACY.md)", planted)
    t.add_row("flagged by memorization check", f"{chk['flagged']} of {chk['images']}")
    t.add_row("distance-to-closest-record train share", f"{chk['dcr_train_share']:.3f}")
    for who, r in refusals.items():
        t.add_row(f"download by {who}", r)
    t.add_row("wall time", f"{wall:.0f} s")
    out.print(t)
    for c in (op, rev, partner, other, anonymous):
        c.close()
    return 0
