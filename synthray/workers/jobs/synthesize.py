"""Synthesize job: sample a batch from a registered generator, then queue its check."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from synthray.app.batches import service as batches
from synthray.app.jobs import service as jobs
from synthray.app.jobs.context import JobContext, JobFailed
from synthray.app.registry import service as registry


def run(ctx: JobContext) -> dict[str, Any]:
    from synthray.models.checkpoint import ChecksumMismatch
    from synthray.models.generators.files import load_generator
    from synthray.models.generators.sampling import sample_images

    batch_id = int(ctx.params["batch_id"])
    with ctx.session() as s:
        batch = batches.get(s, batch_id)
        if batch.check_job_id is not None:
            return {"batch_id": batch_id, "check_job_id": batch.check_job_id}
        mv = registry.get_version_by_id(s, int(ctx.params["model_version_id"]))
        classes, blob = list(mv.classes), mv.blob_sha256
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
    ctx.progress(0, total, "sampling")
    started = time.perf_counter()

    def on_progress(done: int, of: int) -> None:
        rate = done / max(time.perf_counter() - started, 1e-9)
        ctx.progress(done, of, f"sampled {done} of {of} ({rate:.0f} img/s)")

    images, labels = sample_images(
        generator,
        counts,
        seed=int(ctx.params["seed"]),
        device=ctx.settings.device,
        on_progress=on_progress,
    )
    images_blob, _ = ctx.blobs.put_arrays(images=images, labels=labels.astype(np.int64))
    with ctx.session() as s:
        check_job = batches.record_samples(s, ctx.settings, batch_id, images_blob, created_by)
    ctx.progress(len(images), len(images), "sampled; memorization check queued")
    return {"batch_id": batch_id, "images": len(images), "check_job_id": check_job}


def on_failure(ctx: JobContext, state: str) -> None:
    with ctx.session() as s:
        batches.generation_ended(s, int(ctx.params["batch_id"]), state)
