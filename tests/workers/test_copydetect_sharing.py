"""One copy-detection embedding per dataset version for every size that reaches its network
at the same downsampled side: the gate's jobs train it at the first such size and register
it for the next (the real registry, blob store and training, on both databases)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from conftest import World

from synthray.app.datasets import service as datasets
from synthray.app.db import session_scope
from synthray.app.registry import service as registry
from synthray.config import Settings
from synthray.models.gate import copydetect
from synthray.workers.context import WorkerJobContext
from synthray.workers.jobs import _gate


def _scaled(split: datasets.SplitArrays, factor: int) -> datasets.SplitArrays:
    """The split's films at ``factor`` times their side (pixel blocks: area-exact)."""
    block = np.ones((factor, factor), dtype=np.uint8)
    return replace(
        split,
        resolution=split.resolution * factor,
        train_images=np.stack([np.kron(f, block) for f in split.train_images]),
        holdout_images=np.stack([np.kron(f, block) for f in split.holdout_images]),
    )


def test_a_second_size_reuses_the_embedding_of_the_first(
    trained: World, settings: Settings
) -> None:
    ctx = WorkerJobContext(settings, "copydetect-sharing", "test", {})
    with session_scope(settings.sqlalchemy_url) as s:
        version = datasets.resolve_version(s, "nih", None)
        split = datasets.load_split(s, ctx.blobs, version.id, 64)
    at_128, at_256 = _scaled(split, 2), _scaled(split, 4)

    # The world's 64 px embedding saw its films undownsampled: it serves no other size.
    with session_scope(settings.sqlalchemy_url) as s:
        assert registry.quality_encoder(s, version.id, 64, "copydetect") is not None
        assert _gate._shared_copydetect(s, version.id, 128) is None

    model_128, sha_128 = _gate._copydetect(ctx, at_128, version.id)  # trains
    model_256, sha_256 = _gate._copydetect(ctx, at_256, version.id)  # reuses
    assert sha_256 == sha_128
    assert model_256.cfg.resolution == 256 and model_256.cfg.side == model_128.cfg.side == 64
    with session_scope(settings.sqlalchemy_url) as s:
        rows = registry.quality_encoders(s, version.id, "copydetect")
        assert [(r.resolution, r.blob_sha256) for r in rows][1:] == [
            (128, sha_128),
            (256, sha_128),
        ]
        assert rows[2].config["resolution"] == 256 and rows[2].config["trained_at"] == 128
    # The same films at 128 and 256 px embed alike: both reach the network at 64 px (up to
    # rounding, in bf16 where the CPU has the units).
    films = slice(0, 8)
    e256 = copydetect.embed(model_256, at_256.train_images[films])
    e128 = copydetect.embed(model_128, at_128.train_images[films])
    assert (e256 * e128).sum(axis=1).min() > 0.9999
    # A later job at 256 px reads the row registered for it.
    again, sha_again = _gate._copydetect(ctx, at_256, version.id)
    assert sha_again == sha_128 and again.cfg.resolution == 256
