"""Choosing which synthetic images to keep from a larger draw.

Synthesis draws ``oversample`` times the images asked for and keeps, per class, the best
scored. Two scores (the keys of ``SCORED_AS``):

- ``realistic``: the estimated density ratio of the class's real training films to its
  generated images at the image's features (:func:`realest`), in the dataset version's
  self-supervised quality space. Keeping the highest drops the images from where the
  generator puts more mass than the real films have, the idea of discriminator rejection
  sampling (Azadi et al. 2019) with a small cross-fitted regression in place of the
  discriminator. A regression over a class's films as a whole ranks no image for being
  near one film, and every kept image is still gated.
- ``typical``: the probability that the dataset version's supervised quality classifier
  (trained on the real training split only) gives the image's class: the filtering step
  of Lampis et al. (2023, "dynamic sample filtering"). It keeps what the classifier finds
  most typical, so the kept images are more typical than real films are (class
  consistency 0.88 against 0.77 for real unseen films on a 128 px Kermany version), and a
  class whose real films lie near another's (bacterial and viral pneumonia) is pushed away
  from its real films (docs/measurements.md, "Choosing by density ratio").

What it costs: ``oversample`` times the sampling, and the scoring. What it does not
change: every kept image is still checked by the memorization gate like any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from synthray.models.generators.sampling import sample_images

# Fewest real films and generated images of a class that realest compares.
MIN_TO_COMPARE = 10
# Each choice (app.fields.Choice) and what its score is, as the selection record names it.
SCORED_AS = {"realistic": "log_ratio", "typical": "probability"}

# (images (N, R, R) uint8, labels (N,) generator class ids) -> (N,) score, the higher kept
Score = Callable[[np.ndarray, np.ndarray], np.ndarray]


def drawn_counts(counts: dict[int, int], oversample: float) -> dict[int, int]:
    """Images to draw per class for ``counts`` kept ones."""
    if not 1.0 <= oversample <= 16.0:
        raise ValueError(f"oversample must be within [1, 16], got {oversample}")
    return {c: math.ceil(round(n * oversample, 6)) for c, n in counts.items()}


def best_scored(scores: np.ndarray, labels: np.ndarray, counts: dict[int, int]) -> np.ndarray:
    """Indices of, per class ``c``, the ``counts[c]`` images with the highest score (ties:
    the earlier drawn). Sorted, so the kept images stay in the order they were drawn (by
    class, then by index)."""
    keep = []
    for c, n in counts.items():
        mine = np.flatnonzero(labels == c)
        if len(mine) < n:
            raise ValueError(f"class {c}: {len(mine)} images drawn, {n} to keep")
        order = np.argsort(-scores[mine], kind="stable")
        keep.append(mine[order[:n]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def realest(
    real: np.ndarray, generated: np.ndarray, seed: int, dims: int = 32, squares: bool = False
) -> np.ndarray:
    """Per generated image, the log of the estimated density ratio real / generated at its
    features (``real``: one class's training films, ``generated``: that class's draw, both
    (N, D)): the logit of an L2-regularised logistic regression that tells the real films
    from the generated images, classes weighted equally, on the first ``dims`` whitened
    principal components of both; with ``squares`` (for experiments) their squares too, so
    that a spread the generated images have and the real ones lack is seen, not only a
    shift.

    Cross-fitted: each generated image is scored by a regression fitted without it (five
    folds), so that no image ranks as real for having been learned. ``seed`` fixes the
    folds. A linear logit in a few dozen components sees where the draw as a whole sits
    away from the real films, not single films: on the 128 px Kermany version of
    docs/measurements.md the kept images came closer to the real ones in both quality
    spaces. With fewer than MIN_TO_COMPARE real or generated images there is no estimate:
    every score is 0, so the earliest drawn are kept, as if nothing were chosen."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    if min(len(real), len(generated)) < MIN_TO_COMPARE:
        return np.zeros(len(generated))  # no estimate: no preference, the first drawn kept
    out = np.zeros(len(generated))
    components = min(dims, len(real) - 1, real.shape[1])
    for train, held in KFold(n_splits=5, shuffle=True, random_state=seed).split(generated):
        steps: list[Any] = [
            StandardScaler(),
            PCA(n_components=components, whiten=True, random_state=seed),
        ]
        if squares:
            steps.append(FunctionTransformer(lambda z: np.concatenate([z, z * z], axis=1)))
        steps.append(LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))
        model = make_pipeline(*steps)
        x = np.concatenate([real, generated[train]])
        y = np.concatenate([np.ones(len(real)), np.zeros(len(train))])
        model.fit(x, y)
        out[held] = model.decision_function(generated[held])
    return out


def sample_chosen(
    generator: nn.Module,
    counts: dict[int, int],
    *,
    seed: int,
    oversample: float,
    score: Score | None,
    scored_as: str = "score",
    device: str = "auto",
    batch_size: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
    """``counts[c]`` images of every class ``c``, the best by ``score`` of ``oversample``
    times as many; with ``oversample`` 1 (or no score) exactly
    :func:`~synthray.models.generators.sampling.sample_images`.

    One class is drawn and chosen at a time, so no more than one class's draw is held
    beside the images kept (the draws are those of one ``sample_images`` call: its latent
    codes are seeded per class). Returns (images, labels, record): the record (None when
    nothing was selected) gives, per class, the images drawn and kept, the mean score
    before and after the selection, and the lowest kept, named after ``scored_as``
    (``mean_<scored_as>_drawn`` ...). ``batch_size`` is passed on to ``sample_images``."""
    if score is None or oversample <= 1.0:
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
        p = np.asarray(score(x, y), dtype=np.float64)  # (drawn,)
        keep = best_scored(p, y, {c: counts[c]})
        kept_x.append(x[keep])
        kept_y.append(y[keep])
        per_class[int(c)] = {
            "drawn": len(x),
            "kept": len(keep),
            f"mean_{scored_as}_drawn": round(float(p.mean()), 4),
            f"mean_{scored_as}_kept": round(float(p[keep].mean()), 4),
            f"lowest_{scored_as}_kept": round(float(p[keep].min()), 4),
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
