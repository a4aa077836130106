"""Ingest job: decode, de-identify and split a dataset version (``app.datasets.ingest``)."""

from __future__ import annotations

import shutil
from typing import Any

from synthray.app.datasets import ingest as dataset_ingest
from synthray.app.datasets import service as datasets
from synthray.app.jobs.context import JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    try:
        return dataset_ingest.run_ingest(ctx)
    finally:
        # Uploaded originals never outlive their ingest, whatever its outcome.
        upload = ctx.params.get("upload_dir")
        if upload:
            shutil.rmtree(upload, ignore_errors=True)


def on_failure(ctx: JobContext, state: str) -> None:
    with ctx.session() as s:
        datasets.ingest_ended(s, int(ctx.params["version_id"]), state)
