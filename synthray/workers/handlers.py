"""Thin job handlers: load what the job names, call a service or models/, record it.

Each handler is idempotent: a redelivered job finds its earlier output (a registered
version, a stored batch) and does not do the work twice.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from synthray.app.batches import report_html
from synthray.app.batches import repository as batch_repo
from synthray.app.batches import service as batches
from synthray.app.datasets import ingest as dataset_ingest
from synthray.app.datasets import repository as dataset_repo
from synthray.app.datasets import service as datasets
from synthray.app.exports import repository as export_repo
from synthray.app.exports import service as exports
from synthray.app.jobs import repository as job_repo
from synthray.app.jobs.context import JobCancelled, JobFailed
from synthray.app.registry import repository as registry_repo
from synthray.app.registry import service as registry
from synthray.workers.runner import WorkerJobContext

log = logging.getLogger(__name__)


def ingest(ctx: WorkerJobContext) -> dict[str, Any]:
    try:
        return dataset_ingest.run_ingest(ctx)
    finally:
        # Uploaded originals never outlive their ingest, whatever its outcome.
        upload = ctx.params.get("upload_dir")
        if upload:
            shutil.rmtree(upload, ignore_errors=True)


def train(ctx: WorkerJobContext) -> dict[str, Any]:
    from synthray.models.training import TrainConfig, TrainProgress, save_generator, train_gan

    p = ctx.params
    with ctx.session() as s:
        done = registry_repo.by_train_job(s, ctx.job_id)
        if done is not None:  # redelivered after the version was registered
            return {"model_version_id": done.id, "version": done.version}
        split = datasets.load_split(
            s, ctx.blobs, int(p["dataset_version_id"]), int(p["resolution"])
        )
        dv = dataset_repo.get_version(s, int(p["dataset_version_id"]))
        assert dv is not None and dv.content_sha256 is not None
        dataset_sha = dv.content_sha256
    classes = list(p.get("classes") or split.classes)
    keep = [split.classes.index(c) for c in classes]
    remap = {old: new for new, old in enumerate(keep)}
    mask = np.isin(split.train_labels, keep)
    train_images = split.train_images[mask]
    train_labels = np.array([remap[int(v)] for v in split.train_labels[mask]], dtype=np.int64)
    cfg = TrainConfig(
        architecture=p["architecture"],
        resolution=int(p["resolution"]),
        class_names=classes,
        batch_size=int(p["batch_size"]),
        max_steps=p.get("max_steps"),
        max_seconds=p.get("max_seconds"),
        seed=int(p["seed"]),
        lr_g=float(p["lr_g"]),
        lr_d=float(p["lr_d"]),
        device=ctx.settings.device,
        precision=str(p.get("precision", "auto")),
        checkpoint_every_s=float(p.get("checkpoint_every_s", 30.0)),
        progress_every_s=5.0,
    )

    ckpt = ctx.work_dir / "checkpoint.safetensors"
    preview = {"mtime": 0.0, "sha": None}

    def refresh_preview() -> None:
        """A new preview grid whenever a newer checkpoint exists (about every 30 s)."""
        try:
            mtime = ckpt.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == preview["mtime"]:
            return
        from PIL import Image

        from synthray.models.preview import generator_from_checkpoint, preview_grid

        grid = preview_grid(generator_from_checkpoint(ckpt), len(classes))
        buf = io.BytesIO()
        Image.fromarray(grid, "L").save(buf, format="PNG")
        preview["sha"], _ = ctx.blobs.put_bytes(buf.getvalue())
        preview["mtime"] = mtime

    def on_progress(tp: TrainProgress) -> None:
        refresh_preview()
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
            f"step {tp.step}, {tp.images_per_second:.0f} img/s{eta}",
            {
                "step": tp.step,
                "images_seen": tp.images_seen,
                "seconds": round(tp.seconds, 1),
                "images_per_second": round(tp.images_per_second, 1),
                "loss_d": round(tp.loss_d, 4),
                "loss_g": round(tp.loss_g, 4),
                "eta_seconds": None if tp.eta_seconds is None else round(tp.eta_seconds, 1),
                "preview_sha256": preview["sha"],
            },
        )

    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    result = train_gan(
        train_images,
        train_labels,
        cfg,
        checkpoint_path=ckpt,
        on_progress=on_progress,
        should_stop=ctx.should_stop,
    )
    if result.stopped == "cancelled":
        raise JobCancelled()
    gen_path = ctx.work_dir / "generator.safetensors"
    save_generator(
        gen_path,
        result.generator_state,
        result.generator_config,
        extra_meta={"classes": classes, "dataset_sha256": dataset_sha},
    )
    sha, size = ctx.blobs.put_file(gen_path)
    quality, encoder_sha = (
        _quality(ctx, split, classes, gen_path, int(p["dataset_version_id"]))
        if p.get("evaluate", True)
        else ({}, None)
    )
    metrics = {
        "steps": result.steps,
        "images_seen": result.images_seen,
        "train_seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_seen / max(result.seconds, 1e-9), 2),
        "final_loss_d": round(result.final_loss_d, 5),
        "final_loss_g": round(result.final_loss_g, 5),
        "device": result.device,
        "precision": result.precision,
        "train_images": len(train_images),
        "holdout_images": len(split.holdout_images),
        "quality": quality,
    }
    with ctx.session() as s:
        mv = registry.register_version(
            s,
            model_name=p["model_name"],
            dataset_version_id=int(p["dataset_version_id"]),
            dataset_sha256=dataset_sha,
            architecture=p["architecture"],
            config={"train": cfg.to_dict(), "generator": result.generator_config},
            classes=classes,
            train_job_id=ctx.job_id,
            metrics=metrics,
            blob_sha256=sha,
            size_bytes=size,
            encoder_sha256=encoder_sha,
        )
        out = {"model_version_id": mv.id, "version": mv.version, "metrics": metrics}
    return out


def _quality(
    ctx: WorkerJobContext, split: Any, classes: list[str], gen_path: Path, dataset_version_id: int
) -> tuple[dict[str, Any], str]:
    """Offline FID/KID/precision/recall in the dataset's own encoder space, with floors."""
    from synthray.models import quality
    from synthray.models.sampling import sample_images
    from synthray.models.training import load_generator

    resolution = int(split.resolution)
    keep = [split.classes.index(c) for c in classes]
    with ctx.session() as s:
        enc_row = registry.quality_encoder(s, dataset_version_id, resolution)
        enc_sha = enc_row.blob_sha256 if enc_row else None
    if enc_sha is None:
        ctx.progress(0, None, "training the quality-metric encoder on the real training split")
        cfg = quality.EncoderConfig(resolution=resolution, num_classes=len(split.classes))
        enc = quality.train_encoder(
            split.train_images,
            split.train_labels,
            cfg,
            max_steps=ctx.settings.quality_encoder_steps,
            seed=0,
        )
        acc = quality.accuracy(enc, split.holdout_images, split.holdout_labels)
        path = ctx.work_dir / "encoder.safetensors"
        quality.save_encoder(path, enc, {"classes": list(split.classes)})
        new_sha, _ = ctx.blobs.put_file(path)
        with ctx.session() as s:
            enc_sha = registry.register_encoder(
                s, dataset_version_id, resolution, new_sha, cfg.to_dict(), acc
            ).blob_sha256
    encoder = quality.load_encoder(ctx.blobs.path(enc_sha), expected_sha256=enc_sha)
    ctx.progress(0, None, "measuring quality (FID, KID, precision, recall)")
    generator = load_generator(gen_path, expected_sha256=None)
    n = ctx.settings.quality_samples_per_class
    fake_x, fake_y = sample_images(
        generator, {c: n for c in range(len(classes))}, seed=12345, device=ctx.settings.device
    )
    # Labels everywhere index the dataset's classes (the encoder's); generated labels are
    # mapped back from the generator's own class list.
    m_train = np.isin(split.train_labels, keep)
    m_hold = np.isin(split.holdout_labels, keep)
    out = quality.evaluate(
        encoder,
        split.train_images[m_train],
        split.train_labels[m_train],
        split.holdout_images[m_hold],
        split.holdout_labels[m_hold],
        fake_x,
        np.asarray(keep, dtype=np.int64)[fake_y.astype(np.int64)],
        list(split.classes),
    )
    out["encoder_sha256"] = enc_sha
    out["samples_per_class"] = n
    return out, enc_sha


def synthesize(ctx: WorkerJobContext) -> dict[str, Any]:
    from synthray.models.checkpoint import ChecksumMismatch
    from synthray.models.sampling import sample_images
    from synthray.models.training import load_generator

    batch_id = int(ctx.params["batch_id"])
    with ctx.session() as s:
        batch = batches.get(s, batch_id)
        if batch.check_job_id is not None:
            return {"batch_id": batch_id, "check_job_id": batch.check_job_id}
        mv = registry.get_version_by_id(s, int(ctx.params["model_version_id"]))
        classes, blob = list(mv.classes), mv.blob_sha256
        created_by = job_repo.get(s, ctx.job_id).created_by  # type: ignore[union-attr]
    counts = {classes.index(c): int(n) for c, n in ctx.params["counts"].items() if int(n) > 0}
    ctx.progress(0, sum(counts.values()), "loading the generator")
    # The registered file's sha256 is checked before the weights are used.
    try:
        generator = load_generator(ctx.blobs.path(blob), expected_sha256=blob)
    except ChecksumMismatch as exc:
        raise JobFailed(
            "the registered generator file does not match its recorded sha256; refusing to load it"
        ) from exc
    ctx.progress(0, sum(counts.values()), "sampling")
    images, labels = sample_images(
        generator, counts, seed=int(ctx.params["seed"]), device=ctx.settings.device
    )
    images_blob, _ = ctx.blobs.put_arrays(images=images, labels=labels.astype(np.int64))
    with ctx.session() as s:
        check_job = batches.record_samples(s, ctx.settings, batch_id, images_blob, created_by)
    ctx.progress(len(images), len(images), "sampled; memorization check queued")
    return {"batch_id": batch_id, "images": len(images), "check_job_id": check_job}


def _copydetect(ctx: WorkerJobContext, split: Any, dataset_version_id: int) -> Any:
    """The dataset version's copy-detection embedding: trained once on its training split
    (augmented views and same-patient pairs as positives), registered by sha256."""
    from synthray.models import copydetect

    resolution = int(split.resolution)
    with ctx.session() as s:
        row = registry.quality_encoder(s, dataset_version_id, resolution, "copydetect")
        sha = row.blob_sha256 if row else None
    if sha is None:
        ctx.progress(0, None, "training the copy-detection embedding on the training split")
        with ctx.session() as s:
            keys = datasets.patient_keys(s, dataset_version_id, split.train_index)
        cfg = copydetect.CopyDetectConfig(
            resolution=resolution, max_seconds=ctx.settings.copydetect_seconds
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
    return copydetect.load(ctx.blobs.path(sha), expected_sha256=sha), sha


def _gate(
    ctx: WorkerJobContext,
    images: Any,
    labels: Any,
    split: Any,
    *,
    images_sha256: str,
    dataset_version_id: int,
    subject_id: int,
    title: str,
) -> tuple[dict[str, Any], str]:
    """The memorization check of ``images`` against a dataset version's split, in two
    spaces (shift/flip/crop-robust pixel correlation, learned copy-detection embedding):
    the report (JSON-able) and the reviewer's evidence page."""
    from synthray.models.memorization import check_memorization_v2

    embedder, embedder_sha = _copydetect(ctx, split, dataset_version_id)
    ctx.progress(0, len(images), "searching nearest training images (exact)")
    q = ctx.settings.memorization_quantile
    rep = check_memorization_v2(
        images, split.train_images, split.holdout_images, quantile=q, embedder=embedder, k=3
    )
    per_image = []
    for i in range(len(images)):
        row: dict[str, Any] = {
            "flagged_by": [sp for sp in rep.spaces if bool(rep.flagged_by[sp][i])],
            "scores": {sp: round(float(rep.scores[sp][i]), 6) for sp in rep.spaces},
            "best_shift": [int(v) for v in rep.best_shift[i]],
            "best_flip": bool(rep.best_flip[i]),
            "best_scale": [round(float(v), 4) for v in rep.best_scale[i]],
            "ssim": round(float(rep.ssim[i]), 4),
            "authentic": bool(rep.authentic[i]),
        }
        if rep.embedding_neighbours is not None and rep.embedding_similarities is not None:
            row["embedding_neighbour"] = int(split.train_index[int(rep.embedding_neighbours[i, 0])])
        per_image.append(row)
    report = batches.build_report(
        batch_id=subject_id,
        images_sha256=images_sha256,
        labels=labels,
        classes=split.classes,
        threshold=rep.threshold,
        quantile=q,
        holdout_similarity=np.asarray(rep.holdout_nn_similarity, dtype=np.float32),
        similarity=rep.similarities,
        neighbours=rep.neighbours,
        neighbour_similarity=rep.neighbour_similarities,
        flagged=rep.flagged,
        dcr_train_share=rep.dcr_train_share,
        max_flagged_fraction=ctx.settings.max_flagged_fraction,
        max_dcr_train_share=ctx.settings.max_dcr_train_share,
        train_positions=split.train_index,
        extra_per_image=per_image,
        extra_summary={
            "spaces": rep.spaces,
            "thresholds": {k: round(float(v), 6) for k, v in rep.thresholds.items()},
            "authenticity": round(float(rep.authenticity), 6),
            "holdout_flagged_fraction": round(float(rep.holdout_flagged_fraction), 6),
            "copydetect_sha256": embedder_sha,
        },
    )
    report["space"] = (
        "pixel: Pearson correlation, best over shifts of up to 4 px, mirror and slight "
        "rescales of height and width (after a 1 px blur); embedding: cosine in a "
        "copy-detection network trained on this dataset's training split"
    )
    by_position = dict(zip(split.train_index.tolist(), split.train_images, strict=True))
    page = report_html.render(report, images, by_position.__getitem__, title=title)
    ctx.progress(len(images), len(images), "check done")
    return report, page


def check(ctx: WorkerJobContext) -> dict[str, Any]:
    batch_id = int(ctx.params["batch_id"])
    with ctx.session() as s:
        batch = batch_repo.get_for_update(s, batch_id)
        if batch is None:
            raise JobFailed(f"batch {batch_id} not found")
        if batch.state in {"passed", "failed"} and batch.checked_sha256 == batch.images_blob:
            return {"batch_id": batch_id, "state": batch.state}
        if batch.images_blob is None:
            raise JobFailed(f"batch {batch_id} has no images")
        batch.state = "checking"
        mv = registry.get_version_by_id(s, batch.model_version_id)
        resolution = int(mv.config["generator"]["resolution"])
        split = datasets.load_split(s, ctx.blobs, mv.dataset_version_id, resolution)
        images_blob = batch.images_blob
    arrays = ctx.blobs.get_arrays(images_blob)  # hash-verified read
    images, labels = arrays["images"], arrays["labels"]
    # Compared with every training image (a copy is a copy whatever its class); the
    # labels index the model's classes.
    report, page = _gate(
        ctx,
        images,
        labels,
        dataclasses.replace(split, classes=list(mv.classes)),
        images_sha256=images_blob,
        dataset_version_id=mv.dataset_version_id,
        subject_id=batch_id,
        title=f"Memorization check, batch {batch_id}",
    )
    with ctx.session() as s:
        b = batches.record_check(s, ctx.blobs, batch_id, report, page)
        state = b.state
    return {"batch_id": batch_id, "state": state, **report["summary"]}


def imagecheck(ctx: WorkerJobContext) -> dict[str, Any]:
    from synthray.app.imagechecks import repository as check_repo
    from synthray.app.imagechecks import service as imagechecks

    check_id = int(ctx.params["check_id"])
    try:
        with ctx.session() as s:
            c = check_repo.get(s, check_id)
            if c is None:
                raise JobFailed(f"image check {check_id} not found")
            if c.state == "done":
                return {"check_id": check_id, **c.summary}
            split = datasets.load_split(s, ctx.blobs, c.dataset_version_id, c.resolution)
            dataset_version_id = c.dataset_version_id
            c.state = "checking"
        images = imagechecks.decode_folder(ctx, Path(ctx.params["upload_dir"]), c.resolution)
    finally:
        imagechecks.cleanup(ctx)  # uploaded files never outlive the check
    images_blob, _ = ctx.blobs.put_arrays(images=images)
    report, page = _gate(
        ctx,
        images,
        np.zeros(len(images), dtype=np.int64),
        _unlabelled(split),
        images_sha256=images_blob,
        dataset_version_id=dataset_version_id,
        subject_id=check_id,
        title=f"Memorization check of uploaded images ({check_id})",
    )
    with ctx.session() as s:
        c = check_repo.get(s, check_id)
        assert c is not None
        c.report_blob = ctx.blobs.put_bytes(json.dumps(report, indent=1).encode())[0]
        c.report_html_blob = ctx.blobs.put_bytes(page.encode())[0]
        c.summary = {k: v for k, v in report["summary"].items() if k != "per_class"} | {
            "threshold": report["calibration"]["threshold"]
        }
        c.state = "done"
        return {"check_id": check_id, **c.summary}


def _unlabelled(split: Any) -> Any:
    """The split as seen by a check of unlabelled images: one class."""
    return dataclasses.replace(split, classes=["unlabelled"])


def export(ctx: WorkerJobContext) -> dict[str, Any]:
    return exports.build(ctx)


def on_failure(ctx: WorkerJobContext, kind: str, state: str) -> None:
    """Leave the objects a failed or cancelled job owned in a state that says so."""
    with ctx.session() as s:
        if kind == "ingest":
            v = dataset_repo.get_version(s, int(ctx.params["version_id"]))
            if v is not None and v.state == "ingesting":
                v.state = state
        elif kind == "synthesize":
            b = batch_repo.get(s, int(ctx.params["batch_id"]))
            if b is not None and b.state == "generating":
                b.state = state
        elif kind == "check":
            b = batch_repo.get(s, int(ctx.params["batch_id"]))
            if b is not None and b.state == "checking":
                b.state = "unchecked"
        elif kind == "imagecheck":
            from synthray.app.imagechecks import repository as check_repo

            c = check_repo.get(s, int(ctx.params["check_id"]))
            if c is not None and c.state in {"queued", "checking"}:
                c.state = state
        elif kind == "export":
            e = export_repo.get(s, int(ctx.params["export_id"]))
            if e is not None and e.state == "building":
                e.state = state
