"""Offline quality of a trained generator (FID, KID, precision, recall, class consistency)
in two feature spaces of the dataset version's own, beside the real-vs-real floors. Both
encoders (supervised and self-supervised) are trained once per dataset version and
resolution and registered by sha256."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from synthray.app.datasets.service import SplitArrays
from synthray.app.jobs.context import JobContext, JobFailed
from synthray.app.registry import service as registry

if TYPE_CHECKING:  # torch is imported by the jobs that choose, not by this module
    from synthray.models.generators.selection import Score


def encoder(
    ctx: JobContext, split: SplitArrays, dataset_version_id: int, kind: str
) -> tuple[Any, str, dict[str, Any] | None]:
    """The dataset version's quality encoder of ``kind`` (``quality``: supervised on the
    labels; ``quality-ssl``: contrastive, no labels), trained on its training split the
    first time it is needed, with its sha256 and how much training it got ({steps,
    planned_steps, seconds}; None for one registered before that was kept)."""
    from synthray.models.evaluation import quality

    resolution = int(split.resolution)
    with ctx.session() as s:
        row = registry.quality_encoder(s, dataset_version_id, resolution, kind)
        sha = row.blob_sha256 if row else None
        training = (row.config or {}).get("training") if row else None
    if sha is None:
        space = SPACE_OF[kind]
        ctx.progress(0, None, f"training the {space.replace('_', '-')} quality encoder")
        trained = quality.train_space(
            space,
            split.train_images,
            split.train_labels,
            len(split.classes),
            max_steps=ctx.settings.quality_encoder_steps,
            max_seconds=ctx.settings.quality_encoder_seconds,
        )
        acc = (
            quality.accuracy(trained.model, split.holdout_images, split.holdout_labels)
            if kind == SUPERVISED
            else None
        )
        path = ctx.work_dir / f"{kind}.safetensors"
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        training = trained.record()
        quality.save_encoder(
            path,
            trained.model,
            {"classes": list(split.classes), "objective": kind, "training": training},
        )
        new_sha, _ = ctx.blobs.put_file(path)
        config = trained.model.cfg.to_dict() | {"training": training}
        with ctx.session() as s:
            sha = registry.register_encoder(
                s, dataset_version_id, resolution, new_sha, config, acc, kind=kind
            ).blob_sha256
    return quality.load_encoder(ctx.blobs.path(sha), expected_sha256=sha), sha, training


def pool_quality(
    ctx: JobContext,
    split: SplitArrays,
    dataset_version_id: int,
    classes: list[str],
    real: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    pool: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any] | None:
    """The quality of the synthetic images an evaluation used (chosen and gated, as an
    export holds them): in each registered quality space, FID, KID, precision and recall
    against the ``real`` training images beside the floor of the ``test`` images, and the
    class consistency. Labels index ``classes``. None when the dataset version has no
    registered supervised encoder at this resolution (nothing is trained for this)."""
    from synthray.models.evaluation import quality

    if len(pool[0]) == 0:  # arms without synthetic images
        return None
    spaces = {}
    for kind, name in SPACE_OF.items():
        with ctx.session() as s:
            row = registry.quality_encoder(s, dataset_version_id, int(split.resolution), kind)
            sha = row.blob_sha256 if row else None
        if sha is not None:
            spaces[name] = quality.load_encoder(ctx.blobs.path(sha), expected_sha256=sha)
    if "supervised" not in spaces:
        return None
    ids = np.array([list(split.classes).index(c) for c in classes], dtype=np.int64)
    (real_x, real_y), (test_x, test_y), (pool_x, pool_y) = real, test, pool
    out = quality.evaluate(
        spaces,
        spaces["supervised"],
        real_x,
        ids[real_y],
        test_x,
        ids[test_y],
        pool_x,
        ids[pool_y],
        list(split.classes),
    )
    # The shape of a version's quality metrics, overall figures only.
    return {
        "spaces": {
            name: {k: space[k] for k in ("overall", "spread", "as_drawn") if k in space}
            for name, space in out["spaces"].items()
        },
        "class_consistency": {
            side: out["class_consistency"][side] for side in ("generated", "floor")
        },
        "compared_images": out["compared_images"],
        "subsamples": out["subsamples"],
        # A pool is drawn balanced for TSTR; its overall figures compare it in the training
        # images' mix, and "as_drawn" keeps the figures of the pool as it was drawn.
        "class_mix": out["class_mix"],
    }


def chooser(
    ctx: JobContext,
    choice: str,
    oversample: float,
    encoder_sha256: str | None,
    dataset_version_id: int,
    dataset_classes: list[str],
    classes: list[str],
    seed: int,
    films: Callable[[], SplitArrays],
) -> tuple[Score, str] | None:
    """The score by which a synthesis or evaluation of a version keeps images from a
    draw ``oversample`` times larger, with the name the selection record gives it
    (``selection.SCORED_AS``); None when every image drawn is kept (``oversample`` 1, or
    no supervised quality encoder: the version was trained without quality metrics).
    Labels index ``classes``; ``dataset_classes`` are the dataset version's.

    ``typical``: the probability the supervised encoder ``encoder_sha256`` (the version's)
    gives each image of its class. ``realistic``: :func:`selection.realest` against the
    class's training films in the dataset version's self-supervised space; its folds are
    seeded from ``seed`` and the class. Only ``realistic`` calls ``films`` (the version's
    split at the generator's resolution)."""
    from synthray.models.evaluation import quality
    from synthray.models.generators.selection import SCORED_AS, realest

    if oversample <= 1 or encoder_sha256 is None:
        return None
    to_dataset = np.array([dataset_classes.index(c) for c in classes], dtype=np.int64)
    if choice == "typical":
        classifier = quality.load_encoder(
            ctx.blobs.path(encoder_sha256), expected_sha256=encoder_sha256
        )

        def own(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
            p = quality.probabilities_for_choice(classifier, images)  # (N, dataset classes)
            return p[np.arange(len(labels)), to_dataset[labels.astype(np.int64)]]

        return own, SCORED_AS[choice]
    if choice != "realistic":
        raise JobFailed(f"unknown choice {choice!r}")
    split = films()
    ssl, _, _ = encoder(ctx, split, dataset_version_id, SELF_SUPERVISED)
    real_features: dict[int, np.ndarray] = {}  # per class, computed once

    def realism(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        out = np.zeros(len(labels))
        features = quality.features(ssl, images)
        for c in np.unique(labels).tolist():
            if c not in real_features:
                films = split.train_images[split.train_labels == to_dataset[c]]
                real_features[c] = quality.features(ssl, films)
            mine = labels == c
            out[mine] = realest(real_features[c], features[mine], seed=seed * 1009 + c)
        return out

    return realism, SCORED_AS[choice]


def selection_record(
    record: dict[str, Any] | None, classes: list[str], choice: str
) -> dict[str, Any]:
    """The stored account of how images were chosen (``by``: the choice), per class name
    (``record`` from ``selection.sample_chosen``; None when every image drawn was kept)."""
    if record is None:
        return {"oversample": 1.0}
    per_class = {classes[c]: v for c, v in record["per_class"].items()}
    return record | {"by": choice, "per_class": per_class}


SUPERVISED, SELF_SUPERVISED = "quality", "quality-ssl"
SPACE_OF = {SUPERVISED: "supervised", SELF_SUPERVISED: "self_supervised"}  # quality.SPACES
QUALITY_DRAW_SEED = 12345  # the train job's draw for the quality figures and the audit
# Fewest generated images per class, whatever the held-out set holds: class consistency
# is a rate over them.
MIN_SAMPLES_PER_CLASS = 50
GALLERY_PER_CLASS = 8


def samples_per_class(
    holdout_labels: np.ndarray, train_labels: np.ndarray, keep: list[int], most: int
) -> dict[int, int]:
    """Generated images per class of the generator (0 .. len(keep) - 1) for the quality
    metrics. The figures compare generated and held-out sets of one size in the training
    images' class mix (``quality.evaluate``), so the draw follows that mix and stops
    where the held-out images, subsampled in it, run out: more would only be cut away.
    At most ``most`` per class on average, at least MIN_SAMPLES_PER_CLASS each (or
    ``most``, when that is fewer)."""
    from synthray.models.evaluation.quality import class_shares, mix_capacity

    to_own = {c: g for g, c in enumerate(keep)}

    def own(labels: np.ndarray) -> np.ndarray:  # the kept classes' labels, as the generator's
        return np.array([to_own[int(c)] for c in labels if int(c) in to_own], np.int64)

    shares = class_shares(own(train_labels), len(keep))
    total = min(most * len(keep), mix_capacity(own(holdout_labels), shares))
    least = min(MIN_SAMPLES_PER_CLASS, most)
    return {g: max(least, round(total * float(shares[g]))) for g in range(len(keep))}


def measure(
    ctx: JobContext,
    split: SplitArrays,
    classes: list[str],
    gen_path: Path,
    dataset_version_id: int,
    notes: dict[str, str] | None = None,
) -> tuple[dict[str, Any], str, tuple[np.ndarray, np.ndarray]]:
    """The quality figures of the generator at ``gen_path``, the supervised encoder's
    sha256 (the one recorded with the model version), and the generated images of the
    measured classes with their labels (the generator's class ids), for the privacy audit."""
    from synthray.models.evaluation import quality
    from synthray.models.evaluation.gallery import gallery_png
    from synthray.models.generators.files import load_generator
    from synthray.models.generators.sampling import sample_images

    keep = [split.classes.index(c) for c in classes]
    # Classes that synthesis refuses (``notes``) get only their gallery row: their images
    # never leave the building, so they stay out of every figure (a class of one patient
    # would otherwise lift class consistency with near-copies of that patient).
    measured = [c for c in keep if split.classes[c] not in (notes or {})] or keep
    supervised, sup_sha, sup_training = encoder(ctx, split, dataset_version_id, SUPERVISED)
    ssl, ssl_sha, ssl_training = encoder(ctx, split, dataset_version_id, SELF_SUPERVISED)
    generator = load_generator(gen_path, expected_sha256=None)
    m_train = np.isin(split.train_labels, measured)
    m_hold = np.isin(split.holdout_labels, measured)
    counts = samples_per_class(
        split.holdout_labels, split.train_labels, keep, ctx.settings.quality_samples_per_class
    )
    counts |= {g: GALLERY_PER_CLASS for g, c in enumerate(keep) if c not in measured}
    total = sum(counts.values())
    fake_x, fake_y = sample_images(
        generator,
        counts,
        seed=QUALITY_DRAW_SEED,
        device=ctx.settings.device,
        on_progress=lambda done, of: ctx.progress(
            done, of, f"sampling {of} images for the quality metrics"
        ),
    )
    ctx.progress(total, total, "measuring quality (FID, KID, precision, recall, classes)")
    # Labels everywhere index the dataset's classes (the encoders'); generated labels are
    # mapped back from the generator's own class list.
    fake_dataset_y = np.asarray(keep, dtype=np.int64)[fake_y.astype(np.int64)]
    m_fake = np.isin(fake_dataset_y, measured)
    out = quality.evaluate(
        {"supervised": supervised, "self_supervised": ssl},
        supervised,
        split.train_images[m_train],
        split.train_labels[m_train],
        split.holdout_images[m_hold],
        split.holdout_labels[m_hold],
        fake_x[m_fake],
        fake_dataset_y[m_fake],
        list(split.classes),
    )
    out["encoder_sha256"] = sup_sha
    out["ssl_encoder_sha256"] = ssl_sha
    out["encoder_holdout_accuracy"] = quality.accuracy(
        supervised, split.holdout_images[m_hold], split.holdout_labels[m_hold]
    )
    # How much training each space's encoder got: one cut short by its time budget on a
    # slow or busy machine measures in a weaker space (see summary.quality_lines).
    trainings = {"supervised": sup_training, "self_supervised": ssl_training}
    out["encoder_training"] = {name: t for name, t in trainings.items() if t is not None}
    out["samples_per_class"] = {c: counts[g] for g, c in enumerate(classes) if keep[g] in measured}
    # Staff look at this: per class, generated images beside real ones of unseen patients.
    own_class = {dataset_class: g for g, dataset_class in enumerate(keep)}
    g_hold = np.isin(split.holdout_labels, keep)
    hold_y = np.array([own_class[int(v)] for v in split.holdout_labels[g_hold]], dtype=np.int64)
    picture = gallery_png(
        fake_x,
        fake_y,
        split.holdout_images[g_hold],
        hold_y,
        classes,
        per_class=GALLERY_PER_CLASS,
        notes=notes,
    )
    out["gallery_sha256"], _ = ctx.blobs.put_bytes(picture)
    return out, sup_sha, (fake_x[m_fake], fake_y[m_fake].astype(np.int64))
