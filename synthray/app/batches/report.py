"""The memorization gate's report: one typed object, built once, stored as JSON.

A :class:`GateReport` is built from the check's figures (:class:`CheckFigures`, which
``synthray.models.gate.memorization.MemorizationReport`` provides), the gate's policy and the
positions of the training images in their dataset version. Its verdict follows from the
policy and never changes afterwards; :meth:`GateReport.to_dict` is the stored JSON that
reviewers, evidence pages and export bundles read. Neighbours are named by their position
in the dataset version, never by file name or patient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from synthray.config import Settings

SPACES_TEXT = (
    "pixel: Pearson correlation, best over shifts of up to 4 px, mirror and slight "
    "rescales of height and width (after a 1 px blur); embedding: cosine in a "
    "copy-detection network trained on this dataset's training split; registered: "
    "Pearson correlation after an affine registration (rotation up to 10 degrees, scale "
    "within 15 %, shear up to 0.1, shift up to 6 px at 64 px) onto the two nearest training "
    "images of each other space"
)
SEARCH_TEXT = "exact (blocked matrix products), no approximate index"
RULE_TEXT = (
    "flag an image whose nearest-training similarity exceeds the threshold; "
    "flagged images are never exported; the batch fails if the flagged fraction "
    "exceeds max_flagged_fraction or the train share of distance-to-closest-record "
    "exceeds max_dcr_train_share"
)


class CheckFigures(Protocol):
    """What the memorization check measured (arrays over Q synthetic and H holdout images)."""

    spaces: list[str]
    thresholds: dict[str, float]
    holdout_scores: dict[str, np.ndarray]  # (H,) per space
    holdout_flagged_fraction: float
    scores: dict[str, np.ndarray]  # (Q,) per space
    flagged_by: dict[str, np.ndarray]  # (Q,) bool per space
    flagged: np.ndarray  # (Q,) bool
    neighbours: np.ndarray  # (Q, k) train indices, best first, by pixel score
    neighbour_similarities: np.ndarray  # (Q, k)
    best_shift: np.ndarray  # (Q, 2)
    best_flip: np.ndarray  # (Q,)
    best_scale: np.ndarray  # (Q, 2)
    ssim: np.ndarray  # (Q,)
    embedding_neighbours: np.ndarray | None  # (Q, k)
    dcr_train_share: float
    authentic: np.ndarray  # (Q,) bool
    authenticity: float


@dataclass(frozen=True)
class GatePolicy:
    threshold_quantile: float
    max_flagged_fraction: float
    max_dcr_train_share: float
    rule: str = RULE_TEXT

    @classmethod
    def from_settings(cls, settings: Settings) -> GatePolicy:
        return cls(
            threshold_quantile=settings.memorization_quantile,
            max_flagged_fraction=settings.max_flagged_fraction,
            max_dcr_train_share=settings.max_dcr_train_share,
        )


@dataclass(frozen=True)
class Calibration:
    holdout_images: int
    threshold: float  # pixel space
    holdout_similarity_median: float


@dataclass(frozen=True)
class GateSummary:
    images: int
    flagged: int
    flagged_fraction: float
    dcr_train_share: float
    passed: bool
    per_class: dict[str, dict[str, int]]
    spaces: list[str]
    thresholds: dict[str, float]
    authenticity: float
    holdout_flagged_fraction: float
    copydetect_sha256: str | None


@dataclass(frozen=True)
class GateReport:
    subject_id: int  # the batch (or image check) the images belong to
    images_sha256: str  # the exact images checked
    policy: GatePolicy
    calibration: Calibration
    summary: GateSummary
    images: list[dict[str, Any]] = field(repr=False)  # one entry per image, in order

    @property
    def passed(self) -> bool:
        return self.summary.passed

    @classmethod
    def build(
        cls,
        *,
        subject_id: int,
        images_sha256: str,
        labels: np.ndarray,
        classes: list[str],
        figures: CheckFigures,
        policy: GatePolicy,
        train_positions: np.ndarray,
        copydetect_sha256: str | None,
    ) -> GateReport:
        """The report of one check; ``labels`` index ``classes``, neighbours index
        ``train_positions`` (the training images' positions in their dataset version)."""
        f = figures
        pixel = f.scores["pixel"]
        n = len(pixel)
        flagged_fraction = float(f.flagged.mean()) if n else 0.0
        passed = (
            flagged_fraction <= policy.max_flagged_fraction
            and f.dcr_train_share <= policy.max_dcr_train_share
        )
        images = []
        for i in range(n):
            entry: dict[str, Any] = {
                "index": i,
                "class": classes[int(labels[i])],
                "nearest_similarity": round(float(pixel[i]), 6),
                "neighbours": [
                    {
                        "dataset_position": int(train_positions[int(j)]),
                        "similarity": round(float(s), 6),
                    }
                    for j, s in zip(f.neighbours[i], f.neighbour_similarities[i], strict=True)
                ],
                "flagged": bool(f.flagged[i]),
                "flagged_by": [sp for sp in f.spaces if bool(f.flagged_by[sp][i])],
                "scores": {sp: round(float(f.scores[sp][i]), 6) for sp in f.spaces},
                "best_shift": [int(v) for v in f.best_shift[i]],
                "best_flip": bool(f.best_flip[i]),
                "best_scale": [round(float(v), 4) for v in f.best_scale[i]],
                "ssim": round(float(f.ssim[i]), 4),
                "authentic": bool(f.authentic[i]),
            }
            if f.embedding_neighbours is not None:
                entry["embedding_neighbour"] = int(
                    train_positions[int(f.embedding_neighbours[i, 0])]
                )
            images.append(entry)
        holdout = np.asarray(f.holdout_scores["pixel"], dtype=np.float32)
        return cls(
            subject_id=subject_id,
            images_sha256=images_sha256,
            policy=policy,
            calibration=Calibration(
                holdout_images=len(holdout),
                threshold=round(float(f.thresholds["pixel"]), 6),
                holdout_similarity_median=round(float(np.median(holdout)), 6),
            ),
            summary=GateSummary(
                images=n,
                flagged=int(f.flagged.sum()),
                flagged_fraction=round(flagged_fraction, 6),
                dcr_train_share=round(float(f.dcr_train_share), 6),
                passed=passed,
                per_class={
                    c: {
                        "images": int((labels == i).sum()),
                        "flagged": int(f.flagged[labels == i].sum()),
                    }
                    for i, c in enumerate(classes)
                },
                spaces=list(f.spaces),
                thresholds={k: round(float(v), 6) for k, v in f.thresholds.items()},
                authenticity=round(float(f.authenticity), 6),
                holdout_flagged_fraction=round(float(f.holdout_flagged_fraction), 6),
                copydetect_sha256=copydetect_sha256,
            ),
            images=images,
        )

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON document (the format reviewers and bundles read)."""
        return {
            "batch_id": self.subject_id,
            "images_sha256": self.images_sha256,
            "space": SPACES_TEXT,
            "search": SEARCH_TEXT,
            "policy": asdict(self.policy),
            "calibration": asdict(self.calibration),
            "summary": asdict(self.summary),
            "images": self.images,
        }
