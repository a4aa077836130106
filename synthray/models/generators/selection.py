"""Keeping the synthetic images most typical of their class.

A class-conditional generator's images do not all look like the class they were drawn
for: a real-trained classifier calls a quarter of a 128 px Kermany generator's images
another class (its class consistency, 0.73 there). Drawing ``oversample`` times the images
asked for and keeping, per class, those to which such a classifier gives the highest
probability of their class is the filtering step of Lampis et al. (2023, "dynamic sample
filtering") with a classifier trained on the real training split only: the dataset
version's supervised quality encoder, never one that saw a held-out patient.

What it costs: ``oversample`` times the sampling. What it does not change: every kept
image is still checked by the memorization gate like any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from synthray.models.generators.sampling import sample_images

# (images (N, R, R) uint8, labels (N,) generator class ids) -> (N,) probability of the label
OwnProbability = Callable[[np.ndarray, np.ndarray], np.ndarray]


def drawn_counts(counts: dict[int, int], oversample: float) -> dict[int, int]:
    """Images to draw per class for ``counts`` kept ones."""
    if not 1.0 <= oversample <= 16.0:
        raise ValueError(f"oversample must be within [1, 16], got {oversample}")
    return {c: math.ceil(round(n * oversample, 6)) for c, n in counts.items()}


def most_typical(
    own_probability: np.ndarray, labels: np.ndarray, counts: dict[int, int]
) -> np.ndarray:
    """Indices of, per class ``c``, the ``counts[c]`` images with the highest probability of
    their own class (ties: the earlier drawn). Sorted, so the kept images stay in the
    order they were drawn (by class, then by index)."""
    keep = []
    for c, n in counts.items():
        mine = np.flatnonzero(labels == c)
        if len(mine) < n:
            raise ValueError(f"class {c}: {len(mine)} images drawn, {n} to keep")
        order = np.argsort(-own_probability[mine], kind="stable")
        keep.append(mine[order[:n]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def sample_typical(
    generator: nn.Module,
    counts: dict[int, int],
    *,
    seed: int,
    oversample: float,
    own_probability: OwnProbability | None,
    device: str = "auto",
    batch_size: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
    """``counts[c]`` images of every class ``c``, chosen from ``oversample`` times as many
    by ``own_probability``; with ``oversample`` 1 (or no classifier) exactly
    :func:`~synthray.models.generators.sampling.sample_images`.

    One class is drawn and chosen at a time, so no more than one class's draw is held
    beside the images kept (the draws are those of one ``sample_images`` call: its latent
    codes are seeded per class). Returns (images, labels, record): the record (None when
    nothing was selected) gives, per class, the images drawn and kept, the mean
    probability of their class before and after the selection, and the lowest kept.
    ``batch_size`` is passed on to ``sample_images``."""
    if own_probability is None or oversample <= 1.0:
        images, labels = sample_images(
            generator,
            counts,
            seed=seed,
            batch_size=batch_size,
            device=device,
            on_progress=on_progress,
        )
        return images, labels, None
    drawn = drawn_counts(counts, oversample)
    total, done = sum(drawn.values()), 0
    kept_x, kept_y, per_class = [], [], {}
    for c in sorted(c for c, n in counts.items() if n > 0):

        def progress(k: int, _of: int, offset: int = done) -> None:
            if on_progress is not None:
                on_progress(offset + k, total)

        x, y = sample_images(
            generator,
            {c: drawn[c]},
            seed=seed,
            batch_size=batch_size,
            device=device,
            on_progress=progress,
        )
        done += len(x)
        p = np.asarray(own_probability(x, y), dtype=np.float64)  # (drawn,)
        keep = most_typical(p, y, {c: counts[c]})
        kept_x.append(x[keep])
        kept_y.append(y[keep])
        per_class[int(c)] = {
            "drawn": len(x),
            "kept": len(keep),
            "mean_probability_drawn": round(float(p.mean()), 4),
            "mean_probability_kept": round(float(p[keep].mean()), 4),
            "lowest_probability_kept": round(float(p[keep].min()), 4),
        }
    record = {
        "oversample": oversample,
        "drawn": done,
        "kept": int(sum(len(y) for y in kept_y)),
        "per_class": per_class,
    }
    cfg: Any = getattr(generator, "cfg", None)
    r = int(cfg.resolution)
    images = np.concatenate(kept_x) if kept_x else np.zeros((0, r, r), dtype=np.uint8)
    labels = np.concatenate(kept_y) if kept_y else np.zeros(0, dtype=np.int64)
    return images, labels, record
