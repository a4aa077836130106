"""Offline quality of a trained generator (FID, KID, precision, recall) in the dataset
version's own encoder space, beside the real-vs-real floors. The encoder is trained once
per dataset version and resolution and registered by sha256."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from synthray.app.datasets.service import SplitArrays
from synthray.app.jobs.context import JobContext
from synthray.app.registry import service as registry


def measure(
    ctx: JobContext, split: SplitArrays, classes: list[str], gen_path: Path, dataset_version_id: int
) -> tuple[dict[str, Any], str]:
    """The quality figures of the generator at ``gen_path`` and the encoder's sha256."""
    from synthray.models.evaluation import quality
    from synthray.models.gan.files import load_generator
    from synthray.models.gan.sampling import sample_images

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
