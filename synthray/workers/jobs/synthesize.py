"""Synthesize job: sample a batch from a registered generator, then queue its check."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from synthray.app.batches import service as batches
from synthray.app.datasets import service as datasets
from synthray.app.datasets.service import SplitArrays
from synthray.app.jobs import service as jobs
from synthray.app.jobs.context import JobContext, JobFailed
from synthray.app.registry import service as registry
from synthray.workers.jobs import _quality


def run(ctx: JobContext) -> dict[str, Any]:
    from synthray.models.checkpoint import ChecksumMismatch
    from synthray.models.generators.files import load_generator
    from synthray.models.generators.selection import sample_chosen

    batch_id = int(ctx.params["batch_id"])
    # Jobs queued before images were chosen from a larger draw keep every image; those
    # queued before there was a choice of score keep the most typical.
    oversample = float(ctx.params.get("oversample", 1.0))
    choice = str(ctx.params.get("choice", "typical"))
    with ctx.session() as s:
        batch = batches.get(s, batch_id)
        if batch.check_job_id is not None:
            return {"batch_id": batch_id, "check_job_id": batch.check_job_id}
        mv = registry.get_version_by_id(s, int(ctx.params["model_version_id"]))
        classes, blob, encoder_sha = list(mv.classes), mv.blob_sha256, mv.encoder_sha256
        dataset_version_id = mv.dataset_version_id
        resolution = int(mv.config["generator"]["resolution"])
        dataset_classes = list(datasets.ready_version(s, dataset_version_id).classes)
        created_by = jobs.creator(s, ctx.job_id)
    counts = {classes.index(c): int(n) for c, n in ctx.params["counts"].items() if int(n) > 0}
    total = sum(counts.values())
    ctx.progress(0, total, "loading the generator")
    # The registered file's sha256 is checked before the weights are used.
    try:
        generator = load_generator(ctx.blobs.path(blob), expected_sha256=blob)
    except ChecksumMismatch as exc:
        raise JobFailed(
            "the registered generator file does not match its recorded sha256; refusing to load it"
        ) from exc
    seed = int(ctx.params["seed"])

    def films() -> SplitArrays:  # what the realistic choice compares with
        with ctx.session() as s:
            return datasets.load_split(s, ctx.blobs, dataset_version_id, resolution)

    chosen = _quality.chooser(
        ctx,
        choice,
        oversample,
        encoder_sha,
        dataset_version_id,
        dataset_classes,
        classes,
        seed,
        films,
    )
    ctx.progress(0, total, "sampling")
    started = time.perf_counter()
    kept = f", keeping the {choice} {100 / oversample:.0f}% of each class" if chosen else ""

    def on_progress(done: int, of: int) -> None:
        rate = done / max(time.perf_counter() - started, 1e-9)
        ctx.progress(done, of, f"sampled {done} of {of} ({rate:.0f} img/s{kept})")

    images, labels, record = sample_chosen(
        generator,
        counts,
        seed=seed,
        oversample=oversample,
        score=chosen[0] if chosen else None,
        scored_as=chosen[1] if chosen else "score",
        device=ctx.settings.device,
        on_progress=on_progress,
    )
    selection = _quality.selection_record(record, classes, choice)
    images_blob, _ = ctx.blobs.put_arrays(images=images, labels=labels.astype(np.int64))
    with ctx.session() as s:
        check_job = batches.record_samples(
            s, ctx.settings, batch_id, images_blob, created_by, selection
        )
    ctx.progress(len(images), len(images), "sampled; memorization check queued")
    return {
        "batch_id": batch_id,
        "images": len(images),
        "drawn": int(selection.get("drawn", len(images))),
        "check_job_id": check_job,
    }


def on_failure(ctx: JobContext, state: str) -> None:
    with ctx.session() as s:
        batches.generation_ended(s, int(ctx.params["batch_id"]), state)
