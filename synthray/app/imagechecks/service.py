"""Vetting images made elsewhere (another tool's synthetic set, a partner's) with the
same memorization check, against a dataset version's training and held-out patients."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from synthray.app.audit import service as audit
from synthray.app.auth.schemas import Principal
from synthray.app.datasets import service as datasets
from synthray.app.datasets.decode import DecodeOptions
from synthray.app.datasets.pool import DecodePool
from synthray.app.errors import Invalid, NotFound
from synthray.app.imagechecks import repository
from synthray.app.imagechecks.schemas import (
    ImageCheckAccepted,
    ImageCheckCreate,
    ImageCheckState,
)
from synthray.app.imagechecks.tables import ImageCheck
from synthray.app.jobs import service as jobs
from synthray.app.jobs.context import JobContext, JobFailed
from synthray.app.jobs.schemas import JobKind
from synthray.app.storage import BlobStore
from synthray.config import Settings


def request_check(
    session: Session, settings: Settings, req: ImageCheckCreate, folder: Path, who: Principal
) -> ImageCheckAccepted:
    dv = datasets.resolve_version(session, req.dataset, req.version)
    resolution = req.resolution or min(dv.resolutions)
    if resolution not in dv.resolutions:
        raise Invalid(
            f"the dataset version holds {sorted(dv.resolutions)}px images", field="resolution"
        )
    check = repository.add(
        session, ImageCheck(dataset_version_id=dv.id, resolution=resolution, created_by=who.key_id)
    )
    params = {"check_id": check.id, "upload_dir": str(folder)}
    job = jobs.create(session, settings, JobKind.imagecheck, params, who.key_id)
    check.job_id = job.id
    audit.record(session, who, "request_image_check", "image_check", check.id, "ok")
    session.flush()
    return ImageCheckAccepted(check_id=check.id, job_id=job.id)


def get(session: Session, check_id: int) -> ImageCheck:
    c = repository.get(session, check_id)
    if c is None:
        raise NotFound(f"image check {check_id} not found")
    return c


def start(session: Session, check_id: int) -> ImageCheck | None:
    """Mark the check as checking; None when it is already done (a redelivered job)."""
    c = get(session, check_id)
    if c.state == ImageCheckState.done:
        return None
    c.state = ImageCheckState.checking
    session.flush()
    return c


def record_result(
    session: Session, blobs: BlobStore, check_id: int, report: dict[str, Any], page: str
) -> dict[str, Any]:
    """Store the report (JSON and evidence page) and its summary; the check is done.

    Returns the job's result: the check id and the summary.
    """
    c = get(session, check_id)
    c.report_blob = blobs.put_bytes(json.dumps(report, indent=1).encode())[0]
    c.report_html_blob = blobs.put_bytes(page.encode())[0]
    c.summary = {k: v for k, v in report["summary"].items() if k != "per_class"} | {
        "threshold": report["calibration"]["threshold"]
    }
    c.state = ImageCheckState.done
    session.flush()
    return {"check_id": check_id, **c.summary}


def ended(session: Session, check_id: int, state: str) -> None:
    """A check not yet done takes the end state of its failed or cancelled job."""
    c = repository.get(session, check_id)
    if c is not None and c.state in (ImageCheckState.queued, ImageCheckState.checking):
        c.state = ImageCheckState(state)
        session.flush()


def report(session: Session, ctx_blobs: Any, check_id: int, html: bool) -> Any:
    c = get(session, check_id)
    blob = c.report_html_blob if html else c.report_blob
    if blob is None:
        raise NotFound(f"image check {check_id} has no report yet")
    data = ctx_blobs.read_bytes(blob)
    return data.decode() if html else json.loads(data)


def decode_folder(ctx: JobContext, folder: Path, resolution: int) -> np.ndarray:
    """Every readable image of an uploaded folder at ``resolution`` (N, R, R) uint8."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    opts = DecodeOptions(
        sizes=(resolution,),
        secret=ctx.settings.secret_key,
        allow_burned_in=True,  # the pixels are only compared, never kept for training
        max_pixel_bytes=ctx.settings.max_pixel_bytes,
    )
    out = []
    workers = ctx.settings.ingest_workers or os.cpu_count() or 1
    with DecodePool(workers, ctx.settings.decode_memory_limit) as pool:
        for dec, _reason in pool.map(
            [str(f) for f in files], opts, ctx.settings.max_file_bytes, ctx.should_stop
        ):
            if dec is not None:
                out.append(dec.pixels[resolution])
    if not out:
        raise JobFailed(f"none of the {len(files)} uploaded files is a readable image")
    return np.stack(out)


def cleanup(ctx: JobContext) -> None:
    upload = ctx.params.get("upload_dir")
    if upload:
        shutil.rmtree(upload, ignore_errors=True)
