"""Image-check job: the memorization gate over uploaded images (one unlabelled class)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from synthray.app.datasets import service as datasets
from synthray.app.imagechecks import service as imagechecks
from synthray.app.jobs.context import JobContext
from synthray.workers.jobs import _gate


def run(ctx: JobContext) -> dict[str, Any]:
    check_id = int(ctx.params["check_id"])
    try:
        with ctx.session() as s:
            c = imagechecks.start(s, check_id)
            if c is None:  # done already
                return {"check_id": check_id, **imagechecks.get(s, check_id).summary}
            split = datasets.load_split(s, ctx.blobs, c.dataset_version_id, c.resolution)
            dataset_version_id, resolution = c.dataset_version_id, c.resolution
        images = imagechecks.decode_folder(ctx, Path(ctx.params["upload_dir"]), resolution)
    finally:
        imagechecks.cleanup(ctx)  # uploaded files never outlive the check
    images_blob, _ = ctx.blobs.put_arrays(images=images)
    report, page = _gate.check(
        ctx,
        images,
        np.zeros(len(images), dtype=np.int64),
        ["unlabelled"],
        split,
        images_sha256=images_blob,
        dataset_version_id=dataset_version_id,
        subject_id=check_id,
        title=f"Memorization check of uploaded images ({check_id})",
    )
    with ctx.session() as s:
        summary = imagechecks.record_result(s, ctx.blobs, check_id, report.to_dict(), page)
    return {"check_id": check_id, **summary}


def on_failure(ctx: JobContext, state: str) -> None:
    with ctx.session() as s:
        imagechecks.ended(s, int(ctx.params["check_id"]), state)
