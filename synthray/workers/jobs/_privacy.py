"""The membership-inference audit of a newly trained generator, as the train job runs it
(``synthray.models.gate.membership``): members are the images it trained on, non-members
the held-out patients' images of the same classes; the attack spaces are the gate's (robust
pixel correlation and the copy-detection embedding), the two quality encoders', and the
generator's own weights."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from synthray.app.datasets import service as datasets
from synthray.app.datasets.service import SplitArrays, select_classes
from synthray.app.jobs.context import JobContext
from synthray.workers.jobs import _gate, _quality


def planted_copies(
    ctx: JobContext, split: SplitArrays, dataset_version_id: int
) -> dict[str, Any] | None:
    """The gate's detection rate on altered copies of this dataset version's own training
    films (``synthray.models.gate.planted``), per family: the copies are checked exactly as
    a synthetic batch is (same spaces, thresholds and policy). None when switched off."""
    from synthray.models.gate import planted

    per_family = ctx.settings.audit_planted_per_family
    if per_family == 0 or len(split.train_images) == 0:
        return None
    started = time.monotonic()
    copies = planted.plant(split.train_images, per_family, seed=0)
    ctx.progress(0, None, f"planted copies: checking {len(copies.copies)} altered training films")
    flagged, _ = _gate.flagged(ctx, copies.copies, split, dataset_version_id)
    out = planted.detection(flagged, copies.families)
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def audit(
    ctx: JobContext,
    split: SplitArrays,
    classes: list[str],
    gen_path: Path,
    dataset_version_id: int,
    members: tuple[np.ndarray, np.ndarray, np.ndarray],
    drawn: tuple[np.ndarray, np.ndarray],
    refused: set[str],
) -> dict[str, Any]:
    """``members``: the training images, their labels (the generator's class ids) and
    patient keys;
    ``drawn``: the quality metrics' generated images of the classes synthesis serves and
    their labels (the generator's class ids); the audit attacks with them and
    ``audit_synthetic_draws`` - 1 more draws like them. Classes synthesis refuses
    (``refused``) stay out: their images never leave the building."""
    from synthray.models.evaluation import quality
    from synthray.models.gate import copydetect
    from synthray.models.gate.membership import Space, TooFewImages, reidentification
    from synthray.models.gate.membership import audit as run_audit
    from synthray.models.generators.files import load_generator
    from synthray.models.generators.sampling import sample_images

    started = time.monotonic()
    generator = load_generator(gen_path, expected_sha256=None)
    synthetic, drawn_y = drawn
    draws = np.zeros(len(drawn_y), np.int64)  # which draw each image is of
    more = ctx.settings.audit_synthetic_draws - 1
    if more > 0 and len(drawn_y):
        # One draw's nearest-synthetic figures move with the draw; more images steady them,
        # and a partner's bundle holds thousands.
        counts = {c: more * int(n) for c, n in enumerate(np.bincount(drawn_y)) if n}
        extra, extra_y = sample_images(
            generator,
            counts,
            seed=_quality.QUALITY_DRAW_SEED + 1,
            device=ctx.settings.device,
            on_progress=lambda done, of: ctx.progress(
                done, of, f"sampling {of} more images for the membership audit"
            ),
        )
        synthetic = np.concatenate([synthetic, extra])
        draws = np.concatenate([draws, 1 + _split_into_draws(extra_y, more)])
    served = [i for i, c in enumerate(classes) if c not in refused]
    train_images, train_labels, train_keys = members
    keep_train = np.isin(train_labels, served)
    hold_mask, hold_labels = select_classes(split.holdout_labels, list(split.classes), classes)
    hold_images = split.holdout_images[hold_mask]
    keep_hold = np.isin(hold_labels, served)
    with ctx.session() as s:
        hold_keys = datasets.patient_keys(s, dataset_version_id, split.holdout_index)[hold_mask]
    planted = planted_copies(ctx, split, dataset_version_id)
    embedder, embedder_sha = _gate._copydetect(ctx, split, dataset_version_id)
    supervised, _, _ = _quality.encoder(ctx, split, dataset_version_id, _quality.SUPERVISED)
    ssl, _, _ = _quality.encoder(ctx, split, dataset_version_id, _quality.SELF_SUPERVISED)

    def features(enc: Any) -> Any:
        return lambda x: quality.features(enc, x).astype(np.float32)

    spaces = [
        Space("copy-detection", lambda x: copydetect.embed(embedder, x), "ip"),
        Space("supervised encoder", features(supervised), "l2"),
        Space("self-supervised encoder", features(ssl), "l2"),
    ]
    try:
        result = run_audit(
            synthetic,
            train_images[keep_train],
            train_labels[keep_train],
            hold_images[keep_hold],
            hold_labels[keep_hold],
            spaces=spaces,
            generator=generator,
            train_keys=train_keys[keep_train],
            holdout_keys=hold_keys[keep_hold],
            per_group=ctx.settings.audit_per_group,
            seed=0,
            draws=draws,
            on_progress=lambda msg: ctx.progress(0, None, msg),
        )
    except TooFewImages:
        # Some class needs two held-out patients (the control's two sides) and two
        # training patients.
        return {
            "passed": False,
            "skipped": "too few held-out patients of the classes synthesis serves to form "
            "members, non-members and a control",
            "planted_copies": planted,
        }
    ctx.progress(0, None, "re-identification check: calibrating on held-out patients")
    result["reidentification"] = reidentification(
        spaces[0].embed,
        synthetic,
        train_images[keep_train],
        train_keys[keep_train],
        hold_images[keep_hold],
        hold_keys[keep_hold],
    )
    result["planted_copies"] = planted
    result["copydetect_sha256"] = embedder_sha
    result["classes"] = [classes[i] for i in served]
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _split_into_draws(labels: np.ndarray, draws: int) -> np.ndarray:
    """(N,) which of ``draws`` draws each image of one sampling is counted in: each class's
    images split in order into ``draws`` equal parts, so every draw has the class mix of
    the whole (its latent codes are independent draws)."""
    out = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        at = np.flatnonzero(labels == c)
        out[at] = np.arange(len(at)) * draws // len(at)
    return out
