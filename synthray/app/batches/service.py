"""Synthetic batches and the memorization gate's verdict on them.

A batch moves generating -> unchecked -> checking -> passed | failed. The check
records the sha256 of the exact images it looked at; an export is only built from a
passed batch whose images still hash to that value (see exports.service).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from synthray.app.batches import repository
from synthray.app.batches.schemas import BatchRead, SynthesizeAccepted, SynthesizeRequest
from synthray.app.batches.tables import SyntheticBatch
from synthray.app.errors import Invalid, NotFound
from synthray.app.jobs import service as jobs
from synthray.app.jobs.schemas import JobKind
from synthray.app.registry import service as registry
from synthray.app.storage import BlobStore
from synthray.config import Settings


def to_read(b: SyntheticBatch) -> BatchRead:
    return BatchRead(
        id=b.id,
        model_version_id=b.model_version_id,
        state=b.state,
        counts=b.counts,
        seed=b.seed,
        images_sha256=b.images_blob,
        checked_sha256=b.checked_sha256,
        check=b.check,
        synth_job_id=b.synth_job_id,
        check_job_id=b.check_job_id,
        created_at=b.created_at,
    )


def request_synthesis(
    session: Session, settings: Settings, req: SynthesizeRequest, created_by: int
) -> SynthesizeAccepted:
    mv = registry.resolve_version(session, req.model, req.version, req.alias)
    classes = list(mv.classes)
    if req.counts is not None:
        unknown = sorted(set(req.counts) - set(classes))
        if unknown:
            raise Invalid(f"unknown classes {unknown}; the model knows {classes}", field="counts")
        counts = {c: int(req.counts.get(c, 0)) for c in classes}
    else:
        assert req.per_class is not None
        counts = {c: req.per_class for c in classes}
    batch = repository.add(
        session, SyntheticBatch(model_version_id=mv.id, counts=counts, seed=req.seed)
    )
    params = {"batch_id": batch.id, "model_version_id": mv.id, "counts": counts, "seed": req.seed}
    job = jobs.create(session, settings, JobKind.synthesize, params, created_by)
    batch.synth_job_id = job.id
    session.flush()
    return SynthesizeAccepted(batch_id=batch.id, job_id=job.id)


def get(session: Session, batch_id: int) -> SyntheticBatch:
    b = repository.get(session, batch_id)
    if b is None:
        raise NotFound(f"batch {batch_id} not found")
    return b


def list_batches(session: Session, limit: int = 50) -> list[BatchRead]:
    return [to_read(b) for b in repository.list_recent(session, limit)]


def record_samples(
    session: Session, settings: Settings, batch_id: int, images_blob: str, created_by: int | None
) -> str:
    """Store the sampled images on the batch and queue its memorization check."""
    b = repository.get_for_update(session, batch_id)
    if b is None:
        raise NotFound(f"batch {batch_id} not found")
    if b.check_job_id is not None:  # a redelivered synthesis: the check is already queued
        return b.check_job_id
    b.images_blob = images_blob
    b.state = "unchecked"
    job = jobs.create(session, settings, JobKind.check, {"batch_id": batch_id}, created_by)
    b.check_job_id = job.id
    session.flush()
    return job.id


def build_report(
    *,
    batch_id: int,
    images_sha256: str,
    labels: np.ndarray,
    classes: list[str],
    threshold: float,
    quantile: float,
    holdout_similarity: np.ndarray,
    similarity: np.ndarray,
    neighbours: np.ndarray,
    neighbour_similarity: np.ndarray,
    flagged: np.ndarray,
    dcr_train_share: float,
    max_flagged_fraction: float,
    max_dcr_train_share: float,
    train_positions: np.ndarray,
    extra_per_image: list[dict[str, Any]] | None = None,
    extra_summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The memorization report: policy, batch figures and every image's neighbours.

    Neighbours are named by their position in the dataset version, never by file name
    or patient.
    """
    n = len(similarity)
    flagged_fraction = float(flagged.mean()) if n else 0.0
    passed = flagged_fraction <= max_flagged_fraction and dcr_train_share <= max_dcr_train_share
    per_class = {
        c: {
            "images": int((labels == i).sum()),
            "flagged": int(flagged[labels == i].sum()),
        }
        for i, c in enumerate(classes)
    }
    images = [
        {
            "index": i,
            "class": classes[int(labels[i])],
            "nearest_similarity": round(float(similarity[i]), 6),
            "neighbours": [
                {
                    "dataset_position": int(train_positions[int(j)]),
                    "similarity": round(float(s), 6),
                }
                for j, s in zip(neighbours[i], neighbour_similarity[i], strict=True)
            ],
            "flagged": bool(flagged[i]),
            **(extra_per_image[i] if extra_per_image else {}),
        }
        for i in range(n)
    ]
    return {
        "batch_id": batch_id,
        "images_sha256": images_sha256,
        "space": "pixel: Pearson correlation of mean-centred, unit-norm images",
        "search": "exact (blocked matrix products), no approximate index",
        "policy": {
            "threshold_quantile": quantile,
            "max_flagged_fraction": max_flagged_fraction,
            "max_dcr_train_share": max_dcr_train_share,
            "rule": "flag an image whose nearest-training similarity exceeds the threshold; "
            "flagged images are never exported; the batch fails if the flagged fraction "
            "exceeds max_flagged_fraction or the train share of distance-to-closest-record "
            "exceeds max_dcr_train_share",
        },
        "calibration": {
            "holdout_images": len(holdout_similarity),
            "threshold": round(float(threshold), 6),
            "holdout_similarity_median": round(float(np.median(holdout_similarity)), 6),
        },
        "summary": {
            "images": n,
            "flagged": int(flagged.sum()),
            "flagged_fraction": round(flagged_fraction, 6),
            "dcr_train_share": round(float(dcr_train_share), 6),
            "passed": passed,
            "per_class": per_class,
            **(extra_summary or {}),
        },
        "images": images,
    }


def record_check(
    session: Session,
    blobs: BlobStore,
    batch_id: int,
    report: dict[str, Any],
    report_html: str | None = None,
) -> SyntheticBatch:
    b = repository.get_for_update(session, batch_id)
    if b is None:
        raise NotFound(f"batch {batch_id} not found")
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
    b.state = "passed" if summary["passed"] else "failed"
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
