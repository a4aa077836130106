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
from synthray.app.imagechecks.schemas import ImageCheckAccepted, ImageCheckCreate, ImageCheckRead
from synthray.app.imagechecks.tables import ImageCheck
from synthray.app.jobs import service as jobs
from synthray.app.jobs.context import JobContext, JobFailed
from synthray.app.jobs.schemas import JobKind
from synthray.config import Settings


def to_read(c: ImageCheck) -> ImageCheckRead:
    return ImageCheckRead(
        id=c.id,
        dataset_version_id=c.dataset_version_id,
        resolution=c.resolution,
        state=c.state,
        summary=c.summary,
        job_id=c.job_id,
        created_at=c.created_at,
    )


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
