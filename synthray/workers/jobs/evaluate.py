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
from synthray.workers.jobs import _gate

# Extra synthetic images drawn per class, so that flagged ones can be left out.
_MARGIN = 0.1


def run(ctx: JobContext) -> dict[str, Any]:
    from synthray.models.evaluation import utility
    from synthray.models.generators.files import load_generator
    from synthray.models.generators.sampling import sample_images
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
        dataset_version_id = mv.dataset_version_id
        test_version_id = e.test_dataset_version_id
    counts = np.bincount(real.labels, minlength=len(classes))
    test_counts = np.bincount(test_y, minlength=len(classes))
    for name, per_class in (("training", counts), ("test", test_counts)):
        if (per_class == 0).any():
            empty = [classes[i] for i in np.flatnonzero(per_class == 0)]
            raise JobFailed(f"the {name} set has no image of {empty}")

    # The synthetic pool: what the arms need, plus a margin for flagged images.
    arms = list(p["arms"])
    needs = utility.pool_needs(counts, arms)
    draw = {c: int(n + np.ceil(_MARGIN * n)) + 4 for c, n in enumerate(needs) if n > 0}
    ctx.progress(0, sum(draw.values()), f"drawing {sum(draw.values())} synthetic images")
    generator = load_generator(ctx.blobs.path(blob), expected_sha256=blob)
    syn_x, syn_y = sample_images(
        generator,
        draw,
        seed=int(p["synthesis_seed"]),
        device=ctx.settings.device,
        on_progress=lambda done, of: ctx.progress(done, of, f"drew {done} of {of} images"),
    )
    ctx.progress(0, None, f"memorization gate over {len(syn_x)} synthetic images")
    flagged = np.zeros(len(syn_x), dtype=bool)
    embedder_sha = None
    if len(syn_x):
        flagged, embedder_sha = _gate.flagged(ctx, syn_x, split, dataset_version_id)
    keep = np.zeros(len(syn_x), dtype=bool)
    for c, n in enumerate(needs):
        ok = np.flatnonzero((syn_y == c) & ~flagged)
        if len(ok) < n:
            raise JobFailed(
                f"the memorization gate flagged {int(((syn_y == c) & flagged).sum())} of "
                f"{int((syn_y == c).sum())} synthetic images of class {classes[c]!r}; "
                f"{int(n)} unflagged ones are needed"
            )
        keep[ok[: int(n)]] = True
    syn_x, syn_y = syn_x[keep], syn_y[keep]
    gate_seconds = time.perf_counter() - t0

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
            "seed": int(p["synthesis_seed"]),
            "drawn": len(flagged),
            "flagged": int(flagged.sum()),
            "used_per_class": [int(n) for n in needs],
            "copydetect_sha256": embedder_sha,
            "gate_seconds": round(gate_seconds, 1),
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
