"""Preview grids of a generator while it trains: one row per class."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from synthray.models.checkpoint import load_state
from synthray.models.generators.files import load_generator, save_generator
from synthray.models.generators.sampling import sample_images
from synthray.models.generators.training import family_of


def generator_from_checkpoint(path: Path) -> nn.Module | None:
    """The generator a training checkpoint holds (a GAN's EMA copy when it keeps one), or
    None when the run has no generator yet (a latent flow still training its autoencoder)."""
    tensors, meta = load_state(path)
    found = family_of(str(meta.get("architecture"))).generator_in_checkpoint(tensors, meta)
    if found is None:
        return None
    config, state = found
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "g.safetensors"
        save_generator(file, state, config, architecture=meta.get("architecture"))
        return load_generator(file, expected_sha256=None)


def preview_grid(generator: nn.Module, num_classes: int, per_class: int = 8) -> np.ndarray:
    """(C * R, per_class * R) uint8: row c holds ``per_class`` samples of class c, drawn
    with a fixed seed so successive previews show the same latent codes improving."""
    images, labels = sample_images(
        generator, {c: per_class for c in range(num_classes)}, seed=0, device="cpu"
    )
    r = images.shape[1]
    grid = np.zeros((num_classes * r, per_class * r), dtype=np.uint8)
    for c in range(num_classes):
        row = images[labels == c]
        for j in range(min(per_class, len(row))):
            grid[c * r : (c + 1) * r, j * r : (j + 1) * r] = row[j]
    return grid
