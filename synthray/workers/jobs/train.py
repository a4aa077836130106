"""Train job: train a generator on a dataset version's training split, measure its quality,
and register it as a new model version (with a preview grid refreshed while it trains)."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from synthray.app.datasets import service as datasets
from synthray.app.jobs.context import JobCancelled, JobContext
from synthray.app.registry import service as registry
from synthray.workers.jobs import _privacy, _quality

# Train request fields that set TrainConfig fields of the same name when given.
TUNABLE = ("batch_size", "lr_g", "lr_d", "guidance", "sample_steps", "guidance_interval")


def _finite(x: float, digits: int) -> float | None:
    """``x`` rounded, or None where JSON (and PostgreSQL's json type) has no value for it."""
    return round(x, digits) if math.isfinite(x) else None


class _Preview:
    """A new preview grid whenever a newer checkpoint exists (about every 30 s)."""

    def __init__(self, ctx: JobContext, num_classes: int) -> None:
        self.ctx, self.num_classes = ctx, num_classes
        self.checkpoint = ctx.work_dir / "checkpoint.safetensors"
        self.mtime = 0.0
        self.sha: str | None = None

    def refresh(self) -> None:
        try:
            mtime = self.checkpoint.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self.mtime:
            return
        from PIL import Image

        from synthray.models.generators.preview import generator_from_checkpoint, preview_grid

        generator = generator_from_checkpoint(self.checkpoint)
        self.mtime = mtime
        if generator is None:  # nothing to sample yet (a latent flow's autoencoder phase)
            return
        grid = preview_grid(generator, self.num_classes)
        buf = io.BytesIO()
        Image.fromarray(grid, "L").save(buf, format="PNG")
        self.sha, _ = self.ctx.blobs.put_bytes(buf.getvalue())


def run(ctx: JobContext) -> dict[str, Any]:
    from synthray.models.generators.config import TrainConfig, TrainProgress
    from synthray.models.generators.files import save_generator
    from synthray.models.generators.latentflow import tapered_guidance
    from synthray.models.generators.training import train_generator

    p = ctx.params
    dataset_version_id = int(p["dataset_version_id"])
    with ctx.session() as s:
        done = registry.version_for_train_job(s, ctx.job_id)
        if done is not None:  # redelivered after the version was registered
            return {"model_version_id": done.id, "version": done.version}
        split = datasets.load_split(s, ctx.blobs, dataset_version_id, int(p["resolution"]))
        dataset_sha = datasets.content_sha256(s, dataset_version_id)
        classes = list(p.get("classes") or split.classes)
        real = datasets.training_set(
            s,
            split,
            dataset_version_id,
            classes,
            p.get("imbalance"),
            int(p.get("imbalance_seed", 0)),
        )
        keys = datasets.patient_keys(s, dataset_version_id, real.positions)
    train_images, train_labels = real.images, real.labels
    patients_per_class = [len(set(keys[train_labels == c])) for c in range(len(classes))]
    # Settings the request left out (None) take the architecture's defaults.
    tuned = {k: p[k] for k in TUNABLE if p.get(k) is not None}
    cfg = TrainConfig(
        architecture=p["architecture"],
        resolution=int(p["resolution"]),
        class_names=classes,
        max_steps=p.get("max_steps"),
        max_seconds=p.get("max_seconds"),
        seed=int(p["seed"]),
        **tuned,
        device=ctx.settings.device,
        precision=str(p.get("precision", "auto")),
        checkpoint_every_s=float(p.get("checkpoint_every_s", 30.0)),
        progress_every_s=5.0,
    )
    preview = _Preview(ctx, len(classes))

    def on_progress(tp: TrainProgress) -> None:
        preview.refresh()
        eta = f", ETA {tp.eta_seconds:.0f}s" if tp.eta_seconds is not None else ""
        # A step budget is shown in steps; a pure time budget in seconds of training.
        if tp.total_steps is not None:
            step, of = tp.step, tp.total_steps
        elif cfg.max_seconds is not None:
            step, of = min(int(tp.seconds), int(cfg.max_seconds)), int(cfg.max_seconds)
        else:
            step, of = tp.step, None
        ctx.progress(
            step,
            of,
            f"{tp.phase} step {tp.step}, {tp.images_per_second:.0f} img/s{eta}",
            {
                "step": tp.step,
                "images_seen": tp.images_seen,
                "seconds": round(tp.seconds, 1),
                "images_per_second": round(tp.images_per_second, 1),
                "phase": tp.phase,
                "losses": {k: _finite(v, 4) for k, v in tp.losses.items()},
                "eta_seconds": None if tp.eta_seconds is None else round(tp.eta_seconds, 1),
                "preview_sha256": preview.sha,
            },
        )

    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    result = train_generator(
        train_images,
        train_labels,
        cfg,
        checkpoint_path=preview.checkpoint,
        on_progress=on_progress,
        should_stop=ctx.should_stop,
    )
    if result.stopped == "cancelled":
        raise JobCancelled()
    generator_config = dict(result.generator_config)
    if "class_guidance" in generator_config:  # taper the guidance of thin classes
        generator_config["class_guidance"] = tapered_guidance(
            float(generator_config["guidance"]),
            patients_per_class,
            ctx.settings.guidance_full_patients,
        )
    gen_path = ctx.work_dir / "generator.safetensors"
    save_generator(
        gen_path,
        result.generator_state,
        generator_config,
        extra_meta={"classes": classes, "dataset_sha256": dataset_sha},
    )
    sha, size = ctx.blobs.put_file(gen_path)
    minimum = ctx.settings.min_class_patients
    thin = {
        c: f"{n} training patient{'s' if n != 1 else ''}; batches refuse this class"
        for c, n in zip(classes, patients_per_class, strict=True)
        if n < minimum
    }
    quality: dict[str, Any] = {}
    privacy: dict[str, Any] | None = None
    encoder_sha = None
    if p.get("evaluate", True):
        quality, encoder_sha, synthetic = _quality.measure(
            ctx, split, classes, gen_path, dataset_version_id, thin
        )
        privacy = _privacy.audit(
            ctx,
            split,
            classes,
            gen_path,
            dataset_version_id,
            (train_images, train_labels, keys),
            synthetic,
            set(thin),
        )
    metrics = {
        "steps": result.steps,
        "phase_steps": result.phase_steps,
        "images_seen": result.images_seen,
        "train_seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_seen / max(result.seconds, 1e-9), 2),
        "final_losses": {k: _finite(v, 5) for k, v in result.final_losses.items()},
        "device": result.device,
        "precision": result.precision,
        "train_images": len(train_images),
        "holdout_images": len(split.holdout_images),
        "quality": quality,
        # Membership inference against this version (None: not evaluated).
        "privacy_audit": privacy,
    }
    with ctx.session() as s:
        mv = registry.register_version(
            s,
            model_name=p["model_name"],
            dataset_version_id=dataset_version_id,
            dataset_sha256=dataset_sha,
            architecture=p["architecture"],
            config={
                "train": cfg.to_dict(),
                "generator": generator_config,
                # The real images it saw, so utility evaluations use exactly the same.
                "data": {
                    "imbalance": p.get("imbalance"),
                    "imbalance_seed": int(p.get("imbalance_seed", 0)),
                    "train_images_per_class": [
                        int(n) for n in np.bincount(train_labels, minlength=len(classes))
                    ],
                    # Synthesis refuses classes with too few patients to hide among.
                    "train_patients_per_class": patients_per_class,
                },
            },
            classes=classes,
            train_job_id=ctx.job_id,
            metrics=metrics,
            blob_sha256=sha,
            size_bytes=size,
            encoder_sha256=encoder_sha,
        )
        return {"model_version_id": mv.id, "version": mv.version, "metrics": metrics}
