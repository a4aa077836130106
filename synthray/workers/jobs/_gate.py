"""The memorization gate as the check jobs run it: the dataset version's copy-detection
embedding (trained once, registered by sha256), the three-space check of
``synthray.models.gate.memorization``, and its :class:`GateReport` with the evidence page."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from synthray.app.batches import report_html
from synthray.app.batches.report import GatePolicy, GateReport
from synthray.app.datasets import service as datasets
from synthray.app.datasets.service import SplitArrays
from synthray.app.jobs.context import JobContext
from synthray.app.registry import service as registry

# How the jobs run the check (the calibration is computed and keyed with the same): every
# space, the pixel space's shift search scaled with the resolution.
REGISTER = True


def _copydetect(ctx: JobContext, split: SplitArrays, dataset_version_id: int) -> tuple[Any, str]:
    """The dataset version's copy-detection embedding: trained once on its training split
    (augmented views and same-patient pairs as positives), registered by sha256. Sizes
    whose films the network sees at the same downsampled side (128 and 256 px) share one:
    the first such size's job trains it, later ones register it for theirs."""
    from synthray.models.gate import copydetect

    resolution = int(split.resolution)
    with ctx.session() as s:
        row = registry.quality_encoder(s, dataset_version_id, resolution, "copydetect")
        sha = row.blob_sha256 if row else None
        if sha is None:
            sha = _shared_copydetect(s, dataset_version_id, resolution)
    if sha is None:
        ctx.progress(0, None, "training the copy-detection embedding on the training split")
        with ctx.session() as s:
            keys = datasets.patient_keys(s, dataset_version_id, split.train_index)
        cfg = copydetect.CopyDetectConfig(
            resolution=resolution,
            max_seconds=ctx.settings.copydetect_seconds,
            steps=ctx.settings.copydetect_steps,
        )
        trained = copydetect.train(split.train_images, keys, cfg)
        path = ctx.work_dir / "copydetect.safetensors"
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        copydetect.save(path, trained.model)
        new_sha, _ = ctx.blobs.put_file(path)
        with ctx.session() as s:
            sha = registry.register_encoder(
                s,
                dataset_version_id,
                resolution,
                new_sha,
                asdict(trained.config),
                None,
                kind="copydetect",
            ).blob_sha256
    return copydetect.load(ctx.blobs.path(sha), expected_sha256=sha, resolution=resolution), sha


def _shared_copydetect(s: Session, dataset_version_id: int, resolution: int) -> str | None:
    """Register for ``resolution`` the dataset version's embedding trained at another size
    that serves it (:meth:`CopyDetectConfig.serves`); its sha256, or None where there is
    none. The training split is the same patients' films at every size."""
    from synthray.models.gate import copydetect

    for row in registry.quality_encoders(s, dataset_version_id, "copydetect"):
        stored = dict(row.config)
        trained_at = stored.pop("trained_at", None)  # set on rows registered here
        cfg = copydetect.CopyDetectConfig.from_dict(stored)
        if cfg.serves(resolution):
            return registry.register_encoder(
                s,
                dataset_version_id,
                resolution,
                row.blob_sha256,
                {**asdict(cfg.at(resolution)), "trained_at": trained_at or cfg.resolution},
                None,
                kind="copydetect",
            ).blob_sha256
    return None


def _figures(
    ctx: JobContext,
    images: np.ndarray,
    split: SplitArrays,
    dataset_version_id: int,
    *,
    evidence: bool,
) -> tuple[Any, str]:
    """The three-space check of ``images`` against every training image of ``split``, with
    the site's policy; ``evidence`` adds three neighbours, SSIM and the batch figures.
    Returns the check's figures and the copy-detection embedding's sha256."""
    from synthray.models.gate import calibration as stored
    from synthray.models.gate.memorization import check_memorization, pixel_shift_range

    embedder, embedder_sha = _copydetect(ctx, split, dataset_version_id)
    calibration, path = _calibration(ctx, split, embedder, embedder_sha)
    lacking = stored.missing(calibration)
    train_keys = holdout_keys = None
    if evidence:  # the batch figures compare patients, one film each
        with ctx.session() as s:
            train_keys, holdout_keys = datasets.split_patient_keys(s, dataset_version_id, split)
    ctx.progress(0, len(images), "searching nearest training images (exact)")
    figures = check_memorization(
        images,
        split.train_images,
        split.holdout_images,
        quantile=ctx.settings.memorization_quantile,
        embedder=embedder,
        k=3 if evidence else 1,
        with_ssim=evidence,
        batch_figures=evidence,
        calibration=calibration,
        max_shift=pixel_shift_range(split.resolution),
        register=REGISTER,
        train_keys=train_keys,
        holdout_keys=holdout_keys,
    )
    if evidence and stored.missing(calibration) < lacking:
        # The authenticity figure's training-side searches this check made, for later ones.
        stored.save(path, calibration)
    return figures, embedder_sha


def _calibration(
    ctx: JobContext, split: SplitArrays, embedder: Any, embedder_sha: str
) -> tuple[Any, Any]:
    """The gate's calibration on the split's held-out films: computed by the first check
    against this training set, embedding and gate code, reused by every later one; and the
    file it is kept in."""
    from synthray.models.gate import calibration as stored
    from synthray.models.gate.memorization import (
        calibrate,
        calibration_params,
        pixel_shift_range,
    )

    train, holdout = split.train_images, split.holdout_images
    shift = pixel_shift_range(split.resolution)
    params = calibration_params(train, holdout, embedder, shift, REGISTER)
    key = stored.cache_key(train, holdout, embedder_sha, params)

    def compute() -> Any:
        ctx.progress(
            0, None, f"calibrating the gate on {len(holdout)} held-out films (once per dataset)"
        )
        return calibrate(train, holdout, embedder=embedder, max_shift=shift, register=REGISTER)

    directory = ctx.settings.cache_dir / "gate"
    calibration, reused = stored.cached(
        directory, key, compute, keep=ctx.settings.gate_calibrations_kept
    )
    if reused:
        ctx.progress(0, None, f"gate calibration on {len(holdout)} held-out films reused")
    return calibration, stored.path_for(directory, key)


def flagged(
    ctx: JobContext, images: np.ndarray, split: SplitArrays, dataset_version_id: int
) -> tuple[np.ndarray, str]:
    """(N,) bool: which of ``images`` the gate flags against ``split`` (the same policy
    and spaces as a batch check, without the per-image evidence), and the embedding's
    sha256."""
    figures, embedder_sha = _figures(ctx, images, split, dataset_version_id, evidence=False)
    return figures.flagged, embedder_sha


def check(
    ctx: JobContext,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    split: SplitArrays,
    *,
    images_sha256: str,
    dataset_version_id: int,
    subject_id: int,
    title: str,
) -> tuple[GateReport, str]:
    """Check ``images`` (labels index ``classes``) against every training image of
    ``split``: the report and the reviewer's evidence page."""
    figures, embedder_sha = _figures(ctx, images, split, dataset_version_id, evidence=True)
    report = GateReport.build(
        subject_id=subject_id,
        images_sha256=images_sha256,
        labels=labels,
        classes=classes,
        figures=figures,
        policy=GatePolicy.from_settings(ctx.settings),
        train_positions=split.train_index,
        copydetect_sha256=embedder_sha,
    )
    by_position = dict(zip(split.train_index.tolist(), split.train_images, strict=True))
    page = report_html.render(report.to_dict(), images, by_position.__getitem__, title=title)
    ctx.progress(len(images), len(images), "check done")
    return report, page
