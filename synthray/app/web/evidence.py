"""What a reviewer looks at before approving an export: the batch's figures from the
registry, a gallery of its synthetic images per class, and every flagged or borderline
image beside its nearest training images with their scores.

Training images are real patients' images: the page that shows them is staff-only, sent
with ``no-store``, and every view of it is audited by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from synthray.app.batches import service as batches
from synthray.app.batches.report_html import png_data_uri
from synthray.app.datasets import service as datasets
from synthray.app.evaluations import service as evaluations
from synthray.app.evaluations.schemas import format_interval
from synthray.app.exports.tables import Export
from synthray.app.registry import service as registry
from synthray.app.registry.summary import audit_line, quality_lines
from synthray.app.storage import BlobStore

GALLERY_PER_CLASS = 8
MOST_FLAGGED = 40
BORDERLINE = 6
NEIGHBOURS = 3


@dataclass
class Figure:
    src: str  # a data: URI
    caption: str


@dataclass
class EvidenceRow:
    image: Figure
    neighbours: list[Figure]
    flagged: bool
    notes: list[str]


@dataclass
class ExportEvidence:
    model: str
    version: int
    gate: list[tuple[str, str]]
    quality: list[str]
    privacy: str | None
    utility: list[tuple[str, str, str]]  # arm, balanced accuracy, vs DS1
    utility_evaluation_id: int | None
    gallery: dict[str, list[Figure]]
    flagged: list[EvidenceRow]
    borderline: list[EvidenceRow]
    flagged_total: int
    notes: list[str] = field(default_factory=list)


def _gate_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    s, cal = report["summary"], report["calibration"]
    return [
        ("verdict", "PASSED" if s["passed"] else "FAILED"),
        ("images checked", str(s["images"])),
        ("flagged (removed from the bundle)", f"{s['flagged']} ({s['flagged_fraction']:.2%})"),
        ("pixel threshold", f"{cal['threshold']:.4f}"),
        ("calibrated on", f"{cal['holdout_images']} images of held-out patients"),
        ("policy", str(report["policy"].get("rule", ""))),
    ]


def _utility(
    session: Session, model_version_id: int
) -> tuple[list[tuple[str, str, str]], int | None]:
    e = evaluations.latest_done(session, model_version_id)
    if e is None or not e.summary:
        return [], None
    rows = []
    for arm, fig in e.summary["arms"].items():
        vs = (fig.get("vs_ds1") or {}).get("balanced_accuracy")
        rows.append(
            (arm, format_interval(fig["balanced_accuracy"]), format_interval(vs, signed=True))
        )
    return rows, e.id


def _row(im: dict[str, Any], images: np.ndarray, train: dict[int, np.ndarray]) -> EvidenceRow:
    neighbours = [
        Figure(
            png_data_uri(train[nb["dataset_position"]]), f"training image, {nb['similarity']:.4f}"
        )
        for nb in im["neighbours"][:NEIGHBOURS]
        if nb["dataset_position"] in train
    ]
    notes = [f"nearest similarity {im['nearest_similarity']:.4f}"]
    if im.get("flagged_by"):
        notes.append("flagged by: " + ", ".join(im["flagged_by"]))
    if "ssim" in im:
        notes.append(f"SSIM to nearest {im['ssim']:.3f}")
    caption = f"synthetic #{im['index']} ({im['class']})"
    return EvidenceRow(
        Figure(png_data_uri(images[im["index"]]), caption), neighbours, im["flagged"], notes
    )


def for_export(session: Session, blobs: BlobStore, e: Export) -> ExportEvidence:
    batch = batches.get(session, e.batch_id)
    mv = registry.get_version_by_id(session, batch.model_version_id)
    report = batches.report(session, blobs, batch.id)
    assert batch.images_blob is not None
    arrays = blobs.get_arrays(batch.images_blob)
    images, labels = arrays["images"], arrays["labels"]
    entries = report["images"]
    flagged = [im for im in entries if im["flagged"]]
    threshold = report["calibration"]["threshold"]
    # Borderline: the passed images closest to the threshold (the next ones it would take).
    passed = sorted(
        (im for im in entries if not im["flagged"]),
        key=lambda im: threshold - im["nearest_similarity"],
    )[:BORDERLINE]
    shown = flagged[:MOST_FLAGGED] + passed
    positions = sorted(
        {nb["dataset_position"] for im in shown for nb in im["neighbours"][:NEIGHBOURS]}
    )
    train = datasets.images_at(
        session, blobs, mv.dataset_version_id, int(images.shape[-1]), positions
    )
    keep = {im["index"] for im in entries if not im["flagged"]}
    gallery: dict[str, list[Figure]] = {}
    for i, c in enumerate(mv.classes):
        idx = [j for j in np.flatnonzero(labels == i).tolist() if j in keep][:GALLERY_PER_CLASS]
        if idx:
            gallery[c] = [Figure(png_data_uri(images[j]), f"#{j}") for j in idx]
    utility, evaluation_id = _utility(session, mv.id)
    return ExportEvidence(
        model=mv.registered_model.name,
        version=mv.version,
        gate=_gate_rows(report),
        quality=quality_lines(mv.metrics.get("quality") or {}),
        privacy=audit_line(mv.metrics.get("privacy_audit")),
        utility=utility,
        utility_evaluation_id=evaluation_id,
        gallery=gallery,
        flagged=[_row(im, images, train) for im in flagged[:MOST_FLAGGED]],
        borderline=[_row(im, images, train) for im in passed],
        flagged_total=len(flagged),
    )
