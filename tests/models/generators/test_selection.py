"""Keeping the synthetic images most typical of their class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthray.models.generators.dcgan import DCGANConfig, Generator, build_seeded
from synthray.models.generators.sampling import sample_images
from synthray.models.generators.selection import drawn_counts, most_typical, sample_typical


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


def test_most_typical_keeps_the_most_probable_of_each_class_in_drawing_order() -> None:
    p = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.3])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    # Class 1: 0.7 first, then the earlier-drawn of the two 0.3s.
    assert most_typical(p, labels, {0: 2, 1: 2}).tolist() == [1, 2, 3, 5]
    assert most_typical(p, labels, {1: 0}).tolist() == []
    with pytest.raises(ValueError, match="3 images drawn, 4 to keep"):
        most_typical(p, labels, {0: 4})
    assert drawn_counts({0: 3, 1: 10}, 1.5) == {0: 5, 1: 15}
    assert drawn_counts({0: 10}, 1.1) == {0: 11}  # no float error rounds 11 up to 12
    with pytest.raises(ValueError, match="oversample"):
        drawn_counts({0: 1}, 0.5)


def test_the_kept_images_are_the_most_typical_of_the_same_draw() -> None:
    g = _generator()
    counts = {0: 4, 2: 3}
    images, labels, record = sample_typical(
        g, counts, seed=7, oversample=2.5, own_probability=_score, device="cpu"
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
        same, _, none = sample_typical(
            g, counts, seed=7, oversample=oversample, own_probability=chooser, device="cpu"
        )
        assert np.array_equal(same, plain) and none is None


def test_progress_counts_every_image_drawn() -> None:
    seen: list[tuple[int, int]] = []
    sample_typical(
        _generator(),
        {0: 2, 1: 3},
        seed=1,
        oversample=2.0,
        own_probability=_score,
        device="cpu",
        on_progress=lambda done, total: seen.append((done, total)),
    )
    assert seen[-1] == (10, 10) and all(t == 10 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_the_batch_size_reaches_every_generator_call() -> None:
    g, seen = _generator(), []
    one_by_one, _, _ = sample_typical(
        g,
        {0: 2, 1: 3},
        seed=1,
        oversample=2.0,
        own_probability=_score,
        device="cpu",
        batch_size=1,
        on_progress=lambda done, total: seen.append(done),
    )
    assert seen == list(range(1, 11))  # one image per call, ten drawn
    default, _, _ = sample_typical(
        g, {0: 2, 1: 3}, seed=1, oversample=2.0, own_probability=_score, device="cpu"
    )
    assert np.array_equal(one_by_one, default)
