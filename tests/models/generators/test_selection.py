"""Choosing which synthetic images to keep from a larger draw."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch

from synthray.app.fields import Choice
from synthray.models.generators.dcgan import DCGANConfig, Generator, build_seeded
from synthray.models.generators.sampling import sample_images
from synthray.models.generators.selection import (
    SCORED_AS,
    best_scored,
    drawn_counts,
    realest,
    sample_chosen,
)


def _generator() -> Generator:
    cfg = DCGANConfig(num_classes=3, g_channels=8, d_channels=8)
    g = build_seeded(Generator, cfg, torch.Generator().manual_seed(0))
    assert isinstance(g, Generator)
    return g


def _score(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A stand-in classifier: a score in [0, 1) that any change of pixel total moves (an
    untrained generator's images differ too little in mean brightness to rank at the
    record's four decimals)."""
    total = images.reshape(len(images), -1).astype(np.int64).sum(1)
    return (total * 0.6180339887) % 1.0


def test_best_scored_keeps_the_highest_of_each_class_in_drawing_order() -> None:
    p = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.3])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    # Class 1: 0.7 first, then the earlier-drawn of the two 0.3s.
    assert best_scored(p, labels, {0: 2, 1: 2}).tolist() == [1, 2, 3, 5]
    assert best_scored(p, labels, {1: 0}).tolist() == []
    with pytest.raises(ValueError, match="3 images drawn, 4 to keep"):
        best_scored(p, labels, {0: 4})
    assert drawn_counts({0: 3, 1: 10}, 1.5) == {0: 5, 1: 15}
    assert drawn_counts({0: 10}, 1.1) == {0: 11}  # no float error rounds 11 up to 12
    with pytest.raises(ValueError, match="oversample"):
        drawn_counts({0: 1}, 0.5)


def test_the_kept_images_are_the_best_scored_of_the_same_draw() -> None:
    g = _generator()
    counts = {0: 4, 2: 3}
    images, labels, record = sample_chosen(
        g, counts, seed=7, oversample=2.5, score=_score, scored_as="probability", device="cpu"
    )
    assert labels.tolist() == [0] * 4 + [2] * 3 and images.dtype == np.uint8
    # The draw is exactly sample_images' for the larger counts (per-class seeds), and from
    # it the best-scored images of each class were kept.
    pool, pool_y = sample_images(g, {0: 10, 2: 8}, seed=7, device="cpu")
    for c, n in counts.items():
        mine = pool[pool_y == c]
        order = np.argsort(-_score(mine, pool_y[pool_y == c]), kind="stable")[:n]
        assert np.array_equal(images[labels == c], mine[np.sort(order)])
    assert record is not None and (record["drawn"], record["kept"]) == (18, 7)
    for c in counts:
        figures = record["per_class"][c]
        assert figures["mean_probability_kept"] > figures["mean_probability_drawn"]
        assert figures["lowest_probability_kept"] <= figures["mean_probability_kept"]
    # Without a classifier, or with oversample 1, nothing is chosen: sample_images' images.
    plain, _ = sample_images(g, counts, seed=7, device="cpu")
    for oversample, chooser in ((3.0, None), (1.0, _score)):
        same, _, none = sample_chosen(
            g, counts, seed=7, oversample=oversample, score=chooser, device="cpu"
        )
        assert np.array_equal(same, plain) and none is None


def test_progress_counts_every_image_drawn() -> None:
    seen: list[tuple[int, int]] = []
    sample_chosen(
        _generator(),
        {0: 2, 1: 3},
        seed=1,
        oversample=2.0,
        score=_score,
        device="cpu",
        on_progress=lambda done, total: seen.append((done, total)),
    )
    assert seen[-1] == (10, 10) and all(t == 10 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_the_batch_size_reaches_every_generator_call() -> None:
    g, seen = _generator(), []
    one_by_one, _, _ = sample_chosen(
        g,
        {0: 2, 1: 3},
        seed=1,
        oversample=2.0,
        score=_score,
        device="cpu",
        batch_size=1,
        on_progress=lambda done, total: seen.append(done),
    )
    assert seen == list(range(1, 11))  # one image per call, ten drawn
    default, _, _ = sample_chosen(
        g, {0: 2, 1: 3}, seed=1, oversample=2.0, score=_score, device="cpu"
    )
    assert np.array_equal(one_by_one, default)


def test_realest_drops_the_images_from_where_the_draw_has_more_than_the_real_films() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 64))
    # 240 generated images like the real films, and 60 from a region the real films hardly
    # reach (shifted along 8 of 64 features): the 240 best scored are nearly all the first.
    off = np.r_[np.full(8, 2.0), np.zeros(56)]
    generated = np.concatenate([rng.normal(size=(240, 64)), rng.normal(size=(60, 64)) + off])
    scores = realest(real, generated, seed=3)
    kept = best_scored(scores, np.zeros(300, np.int64), {0: 240})
    assert (kept >= 240).sum() <= 6, "more than a tenth of the off-region images kept"
    # The folds are seeded, so the choice is repeatable; another seed scores a little
    # differently but keeps the same side.
    assert np.array_equal(realest(real, generated, seed=3), scores)
    other = best_scored(realest(real, generated, seed=4), np.zeros(300, np.int64), {0: 240})
    assert (other >= 240).sum() <= 6
    # A draw the regression cannot tell from the real films scores near 0 (log ratio 1):
    # no image is strongly preferred when there is nothing to correct.
    twin = realest(real, rng.normal(size=(300, 64)), seed=0)
    assert abs(twin.mean()) < 0.1 and twin.std() < 0.6
    # Too few to estimate anything: no preference, so the earliest drawn are kept.
    assert not realest(real[:9], generated, seed=0).any()
    assert not realest(real, generated[:9], seed=0).any()


def test_every_choice_the_api_accepts_has_a_score() -> None:
    assert set(get_args(Choice)) == set(SCORED_AS)
