"""Evaluate job: the downstream utility of a generator's images (app.evaluations).

The real training images are exactly those the generator trained on; the synthetic pool is
drawn here with the recorded seed, sized to what the arms need, and passed through the
memorization gate; flagged images are left out. The classifiers and their scores come
from ``synthray.models.evaluation.utility``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from synthray.app.datasets import service as datasets
from synthray.app.evaluations import service as evaluations
from synthray.app.jobs.context import JobCancelled, JobContext, JobFailed
from synthray.app.registry import service as registry
from synthray.workers.jobs import _gate, _quality

# Extra synthetic images drawn per class, so that flagged ones can be left out, and how
# many draws a class the gate flags more often may take.
_MARGIN = 0.1
_ROUNDS = 3


def draw_sizes(missing: np.ndarray, drawn: np.ndarray, flagged: np.ndarray) -> dict[int, int]:
    """How many images to draw per class for what each still lacks (``missing``), given
    how many were drawn and flagged so far: the margin, scaled up by the class's observed
    flag rate (at most 80% assumed, so one draw stays bounded)."""
    rate = np.where(drawn > 0, flagged / np.maximum(drawn, 1), 0.0)
    return {
        c: int(np.ceil(round(n * (1 + _MARGIN) / max(1.0 - float(rate[c]), 0.2), 6))) + 4
        for c, n in enumerate(missing)
        if n > 0
    }


def run(ctx: JobContext) -> dict[str, Any]:
    from synthray.models.evaluation import utility
    from synthray.models.generators.files import load_generator
    from synthray.models.generators.sampling import derived_seed
    from synthray.models.generators.selection import sample_chosen
    from synthray.models.runtime import resolve_device

    t0 = time.perf_counter()
    evaluation_id = int(ctx.params["evaluation_id"])
    with ctx.session() as s:
        e = evaluations.start(s, evaluation_id)
        if e is None:  # finished before this delivery
            return {"evaluation_id": evaluation_id, **evaluations.get(s, evaluation_id).summary}
        p = dict(e.params)
        mv = registry.get_version_by_id(s, e.model_version_id)
        classes, blob = list(mv.classes), mv.blob_sha256
        resolution = int(mv.config["generator"]["resolution"])
        data = mv.config.get("data") or {}
        split = datasets.load_split(s, ctx.blobs, mv.dataset_version_id, resolution)
        real = datasets.training_set(
            s,
            split,
            mv.dataset_version_id,
            classes,
            data.get("imbalance"),
            int(data.get("imbalance_seed", 0)),
        )
        if e.test_dataset_version_id is None:
            mask, test_y = datasets.select_classes(split.holdout_labels, split.classes, classes)
            test_x = split.holdout_images[mask]
            test_name = f"held-out patients of dataset version {mv.dataset_version_id}"
        else:
            test = datasets.load_split(s, ctx.blobs, e.test_dataset_version_id, resolution)
            all_x = np.concatenate([test.train_images, test.holdout_images])
            all_y = np.concatenate([test.train_labels, test.holdout_labels])
            mask, test_y = datasets.select_classes(all_y, test.classes, classes)
            test_x = all_x[mask]
            test_name = f"all images of dataset version {e.test_dataset_version_id}"
        model_version = {"id": mv.id, "version": mv.version, "blob_sha256": blob}
        encoder_sha = mv.encoder_sha256
        dataset_version_id = mv.dataset_version_id
        test_version_id = e.test_dataset_version_id
    counts = np.bincount(real.labels, minlength=len(classes))
    test_counts = np.bincount(test_y, minlength=len(classes))
    for name, per_class in (("training", counts), ("test", test_counts)):
        if (per_class == 0).any():
            empty = [classes[i] for i in np.flatnonzero(per_class == 0)]
            raise JobFailed(f"the {name} set has no image of {empty}")

    # The synthetic pool: what the arms need, plus a margin for flagged images. A class the
    # gate flags more often than the margin allows is drawn again (new latent codes) for
    # what it still lacks, sized by its observed flag rate, up to _ROUNDS draws.
    arms = list(p["arms"])
    needs = utility.pool_needs(counts, arms)
    generator = load_generator(ctx.blobs.path(blob), expected_sha256=blob)
    # Chosen as synthesis chooses a batch's images (evaluations queued before that: all;
    # before there was a choice of score: the most typical).
    oversample = float(p.get("oversample", 1.0))
    choice = str(p.get("choice", "typical"))
    seed = int(p["synthesis_seed"])
    chosen = _quality.chooser(
        ctx,
        choice,
        oversample,
        encoder_sha,
        dataset_version_id,
        list(split.classes),
        classes,
        seed,
        lambda: split,
    )
    selections: list[dict[str, Any]] = []
    kept_x: list[np.ndarray] = []
    kept_y: list[np.ndarray] = []
    have = np.zeros(len(classes), dtype=np.int64)
    drawn_per_class = np.zeros(len(classes), dtype=np.int64)
    flagged_per_class = np.zeros(len(classes), dtype=np.int64)
    embedder_sha = None
    draws = 0
    draw_seconds = gate_seconds = 0.0  # the drawing (with the choice) and the gate, apart
    while draws < _ROUNDS and (missing := np.maximum(needs - have, 0)).any():
        draws += 1
        draw = draw_sizes(missing, drawn_per_class, flagged_per_class)
        total = sum(draw.values())
        ctx.progress(0, total, f"drawing {total} synthetic images (draw {draws})")
        t_draw = time.perf_counter()
        x, y, record = sample_chosen(
            generator,
            draw,
            # The recorded seed for the first draw, one derived from it for later draws.
            seed=seed if draws == 1 else derived_seed(seed, draws),
            oversample=oversample,
            score=chosen[0] if chosen else None,
            scored_as=chosen[1] if chosen else "score",
            device=ctx.settings.device,
            on_progress=lambda done, of: ctx.progress(done, of, f"drew {done} of {of} images"),
        )
        selections.append(_quality.selection_record(record, classes, choice))
        t_gate = time.perf_counter()
        draw_seconds += t_gate - t_draw
        ctx.progress(0, None, f"memorization gate over {len(x)} synthetic images")
        flagged, embedder_sha = _gate.flagged(ctx, x, split, dataset_version_id)
        gate_seconds += time.perf_counter() - t_gate
        for c in range(len(classes)):
            mine = y == c
            drawn_per_class[c] += int(mine.sum())
            flagged_per_class[c] += int((mine & flagged).sum())
            ok = np.flatnonzero(mine & ~flagged)[: int(missing[c])]
            kept_x.append(x[ok])
            kept_y.append(y[ok])
            have[c] += len(ok)
    short = np.flatnonzero(have < needs)
    if len(short):
        c = int(short[0])
        raise JobFailed(
            f"the memorization gate flagged {int(flagged_per_class[c])} of "
            f"{int(drawn_per_class[c])} synthetic images of class {classes[c]!r} over "
            f"{_ROUNDS} draws; {int(needs[c])} unflagged ones are needed"
        )
    syn_x = np.concatenate(kept_x) if kept_x else np.zeros((0, resolution, resolution), np.uint8)
    syn_y = np.concatenate(kept_y) if kept_y else np.zeros(0, np.int64)
    ctx.progress(0, None, "measuring the synthetic pool (FID, precision, recall, classes)")
    pool_quality = _quality.pool_quality(
        ctx,
        split,
        dataset_version_id,
        classes,
        (real.images, real.labels),
        (test_x, test_y),
        (syn_x, syn_y),
    )

    cfg = utility.ClassifierConfig(
        steps=int(p["steps"]), batch_size=int(p["batch_size"]), width=int(p["width"])
    )

    def on_progress(done: int, total: int, message: str) -> None:
        ctx.progress(done, total, message)

    try:
        result = utility.evaluate_utility(
            real.images,
            real.labels,
            syn_x,
            syn_y,
            test_x,
            test_y,
            classes,
            cfg,
            seeds=list(range(int(p["seeds"]))),
            arms=arms,
            device=str(resolve_device(ctx.settings.device)),
            on_progress=on_progress,
            should_stop=ctx.should_stop,
        )
    except utility.Cancelled as exc:
        raise JobCancelled() from exc
    except ValueError as exc:  # an arm the data cannot support, said in our own words
        raise JobFailed(str(exc)) from exc
    out = result.to_dict() | {
        "lineage": {
            "model_version": model_version,
            "dataset_version_id": dataset_version_id,
            "test_set": test_name,
            "test_dataset_version_id": test_version_id,
            "classifier": cfg.to_dict(),
            "imbalance": data.get("imbalance"),
            "imbalance_seed": int(data.get("imbalance_seed", 0)),
        },
        "synthetic": {
            "seed": seed,
            "draws": draws,
            "drawn": int(drawn_per_class.sum()),
            "flagged": int(flagged_per_class.sum()),
            "drawn_per_class": [int(n) for n in drawn_per_class],
            "flagged_per_class": [int(n) for n in flagged_per_class],
            "used_per_class": [int(n) for n in needs],
            "copydetect_sha256": embedder_sha,
            # Per draw: how its images were chosen from a larger one (oversample 1: all).
            "selection": selections,
            # Seconds spent drawing (and choosing) the images, and checking them.
            "draw_seconds": round(draw_seconds, 1),
            "gate_seconds": round(gate_seconds, 1),
            # The pool as the classifiers saw it, in the version's quality spaces.
            "quality": pool_quality,
        },
        "real_train_per_class": [int(n) for n in counts],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    with ctx.session() as s:
        summary = evaluations.record_result(
            s, ctx.blobs, evaluation_id, out, result.to_csv(), utility.chart_png(result)
        )
    return {"evaluation_id": evaluation_id, **summary}


def on_failure(ctx: JobContext, state: str) -> None:
    with ctx.session() as s:
        evaluations.ended(s, int(ctx.params["evaluation_id"]), state)
