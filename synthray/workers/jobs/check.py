"""Check job: the memorization gate over a synthesized batch, against every training image
of the generator's dataset version (a copy is a copy whatever its class)."""

from __future__ import annotations

from typing import Any

from synthray.app.batches import service as batches
from synthray.app.datasets import service as datasets
from synthray.app.jobs.context import JobContext
from synthray.app.registry import service as registry
from synthray.workers.jobs import _gate


def run(ctx: JobContext) -> dict[str, Any]:
    batch_id = int(ctx.params["batch_id"])
    with ctx.session() as s:
        batch = batches.start_check(s, batch_id)
        if batch is None:  # checked already, images unchanged
            done = batches.get(s, batch_id)
            return {"batch_id": batch_id, "state": done.state}
        mv = registry.get_version_by_id(s, batch.model_version_id)
        resolution = int(mv.config["generator"]["resolution"])
        split = datasets.load_split(s, ctx.blobs, mv.dataset_version_id, resolution)
        images_blob = batch.images_blob
        classes, dataset_version_id = list(mv.classes), mv.dataset_version_id
    assert images_blob is not None
    arrays = ctx.blobs.get_arrays(images_blob)  # hash-verified read
    report, page = _gate.check(
        ctx,
        arrays["images"],
        arrays["labels"],
        classes,
        split,
        images_sha256=images_blob,
        dataset_version_id=dataset_version_id,
        subject_id=batch_id,
        title=f"Memorization check, batch {batch_id}",
    )
    summary = report.to_dict()["summary"]
    with ctx.session() as s:
        state = batches.record_check(s, ctx.blobs, batch_id, report.to_dict(), page).state
    return {"batch_id": batch_id, "state": state, **summary}


def on_failure(ctx: JobContext, state: str) -> None:
    with ctx.session() as s:
        batches.check_aborted(s, int(ctx.params["batch_id"]))
