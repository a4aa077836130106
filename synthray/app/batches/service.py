"""Synthetic batches and the memorization gate's verdict on them.

A batch moves generating -> unchecked -> checking -> passed | failed. The check
records the sha256 of the exact images it looked at; an export is only built from a
passed batch whose images still hash to that value (see exports.service).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from synthray.app.batches import repository
from synthray.app.batches.schemas import (
    BatchRead,
    BatchState,
    SynthesizeAccepted,
    SynthesizeRequest,
)
from synthray.app.batches.tables import SyntheticBatch
from synthray.app.errors import Invalid, NotFound
from synthray.app.jobs import service as jobs
from synthray.app.jobs.context import JobFailed
from synthray.app.jobs.schemas import JobKind
from synthray.app.registry import service as registry
from synthray.app.storage import BlobStore
from synthray.config import Settings


def request_synthesis(
    session: Session, settings: Settings, req: SynthesizeRequest, created_by: int
) -> SynthesizeAccepted:
    mv = registry.resolve_version(session, req.model, req.version, req.alias)
    classes = list(mv.classes)
    if req.counts is not None:
        unknown = sorted(set(req.counts) - set(classes))
        if unknown:
            raise Invalid(
                f"counts names {len(unknown)} class(es) the model does not know; "
                f"it knows {classes}",
                field="counts",
            )
        counts = {c: int(req.counts.get(c, 0)) for c in classes}
    else:
        assert req.per_class is not None
        counts = {c: req.per_class for c in classes}
    oversample = registry.oversample_for(mv, req.oversample, settings)
    if sum(counts.values()) > settings.max_batch_images:
        raise Invalid(
            f"a batch may hold at most {settings.max_batch_images} images "
            "(SYNTHRAY_MAX_BATCH_IMAGES); ask for fewer or split the request",
            field="counts" if req.counts is not None else "per_class",
        )
    _refuse_thin_classes(mv.config, classes, counts, settings.min_class_patients)
    batch = repository.add(
        session, SyntheticBatch(model_version_id=mv.id, counts=counts, seed=req.seed)
    )
    params = {
        "batch_id": batch.id,
        "model_version_id": mv.id,
        "counts": counts,
        "seed": req.seed,
        "oversample": oversample,
        "choice": req.choice or settings.synthesis_choice,
    }
    job = jobs.create(session, settings, JobKind.synthesize, params, created_by)
    batch.synth_job_id = job.id
    session.flush()
    return SynthesizeAccepted(batch_id=batch.id, job_id=job.id)


def _refuse_thin_classes(
    config: dict[str, Any], classes: list[str], counts: dict[str, int], minimum: int
) -> None:
    """A class whose generator saw fewer than ``minimum`` patients cannot be synthesized
    without reproducing them; refuse before anything is sampled. Versions registered
    before patients were counted are not checked here (the gate still is)."""
    patients = (config.get("data") or {}).get("train_patients_per_class")
    if patients is None:
        return
    thin = [
        f"{c} ({n} patient{'s' if n != 1 else ''})"
        for c, n in zip(classes, patients, strict=True)
        if counts.get(c, 0) > 0 and n < minimum
    ]
    if thin:
        raise Invalid(
            f"too few training patients to synthesize {', '.join(thin)}: at least {minimum} "
            "are needed (SYNTHRAY_MIN_CLASS_PATIENTS); ask for the other classes with counts",
            field="counts",
        )


def get(session: Session, batch_id: int) -> SyntheticBatch:
    b = repository.get(session, batch_id)
    if b is None:
        raise NotFound(f"batch {batch_id} not found")
    return b


def _get_for_update(session: Session, batch_id: int) -> SyntheticBatch:
    b = repository.get_for_update(session, batch_id)
    if b is None:
        raise NotFound(f"batch {batch_id} not found")
    return b


def list_batches(session: Session, limit: int = 50) -> list[BatchRead]:
    return [BatchRead.model_validate(b) for b in repository.list_recent(session, limit)]


def record_samples(
    session: Session,
    settings: Settings,
    batch_id: int,
    images_blob: str,
    created_by: int | None,
    selection: dict[str, Any],
) -> str:
    """Store the sampled images, and how they were chosen from those drawn, on the batch
    and queue its memorization check."""
    b = _get_for_update(session, batch_id)
    if b.check_job_id is not None:  # a redelivered synthesis: the check is already queued
        return b.check_job_id
    b.images_blob = images_blob
    b.selection = selection
    b.state = BatchState.unchecked
    job = jobs.create(session, settings, JobKind.check, {"batch_id": batch_id}, created_by)
    b.check_job_id = job.id
    session.flush()
    return job.id


def generation_ended(session: Session, batch_id: int, state: str) -> None:
    """A batch still generating takes the end state of its failed or cancelled synthesis."""
    b = repository.get(session, batch_id)
    if b is not None and b.state == BatchState.generating:
        b.state = BatchState(state)
        session.flush()


def start_check(session: Session, batch_id: int) -> SyntheticBatch | None:
    """Lock the batch and mark it checking; None when the images it holds were already
    checked (a redelivered check job has nothing to do)."""
    b = _get_for_update(session, batch_id)
    if b.state in (BatchState.passed, BatchState.failed) and b.checked_sha256 == b.images_blob:
        return None
    if b.images_blob is None:
        raise JobFailed(f"batch {batch_id} has no images")
    b.state = BatchState.checking
    session.flush()
    return b


def check_aborted(session: Session, batch_id: int) -> None:
    """A batch whose check job failed or was cancelled goes back to unchecked."""
    b = repository.get(session, batch_id)
    if b is not None and b.state == BatchState.checking:
        b.state = BatchState.unchecked
        session.flush()


def record_check(
    session: Session,
    blobs: BlobStore,
    batch_id: int,
    report: dict[str, Any],
    report_html: str | None = None,
) -> SyntheticBatch:
    b = _get_for_update(session, batch_id)
    blob, _ = blobs.put_bytes(json.dumps(report, indent=1).encode())
    summary = report["summary"]
    b.report_blob = blob
    b.checked_sha256 = report["images_sha256"]
    b.check = {
        "threshold": report["calibration"]["threshold"],
        "policy": report["policy"],
        **{k: v for k, v in summary.items() if k != "per_class"},
        "per_class": summary["per_class"],
        "report_sha256": blob,
        "report_html_sha256": blobs.put_bytes(report_html.encode())[0] if report_html else None,
    }
    b.state = BatchState.passed if summary["passed"] else BatchState.failed
    session.flush()
    return b


def report_html(session: Session, blobs: BlobStore, batch_id: int) -> str:
    b = get(session, batch_id)
    sha = b.check.get("report_html_sha256") if b.check else None
    if not sha:
        raise NotFound(f"batch {batch_id} has no evidence page")
    return blobs.read_bytes(sha).decode()


def report(session: Session, blobs: BlobStore, batch_id: int) -> dict[str, Any]:
    b = get(session, batch_id)
    if b.report_blob is None:
        raise NotFound(f"batch {batch_id} has not been checked yet")
    data: dict[str, Any] = json.loads(blobs.read_bytes(b.report_blob))
    return data
