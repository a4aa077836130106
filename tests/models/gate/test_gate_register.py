"""Affine registration of a synthetic image onto its candidate training images: real NIH
films rotated, sheared, zoomed, moved and mirrored line up with their source again, while
other patients' films stay clearly apart; the rotated-probe search finds a rotated copy's
source; and the check flags such copies in its "registered" space."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from support import load_nih

from synthray.models.gate.memorization import check_memorization
from synthray.models.gate.register import registered_scores, rotation_candidates


def _warp(img: np.ndarray, degrees: float, scale: float, shear: float, shift: float) -> np.ndarray:
    """The film rotated, sheared and zoomed about its centre and moved (bilinear)."""
    r = img.shape[0]
    a = np.deg2rad(degrees)
    m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1, shear], [0, 1]])
    m = m / scale
    c = (r - 1) / 2
    t = np.array([c, c]) - m @ np.array([c, c]) + shift
    ys, xs = np.mgrid[0:r, 0:r].astype(np.float32)
    out = ndimage.map_coordinates(
        img.astype(np.float32),
        [m[1, 0] * xs + m[1, 1] * ys + t[1], m[0, 0] * xs + m[0, 1] * ys + t[0]],
        order=1,
        mode="nearest",
    )
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def films() -> np.ndarray:
    images, _ = load_nih()
    return np.array(images[:300])  # a writable copy (the loaded set is read-only)


def test_warped_films_register_onto_their_source_and_others_do_not(films: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    src = rng.choice(len(films), 24, replace=False)
    copies = []
    for i, s in enumerate(src):
        img = _warp(
            films[s], rng.uniform(-8, 8), rng.uniform(0.92, 1.08), rng.uniform(-0.08, 0.08),
            rng.uniform(-3, 3),
        )  # fmt: skip
        copies.append(img[:, ::-1] if i % 3 == 0 else img)  # every third also mirrored
    copies_arr = np.stack(copies)
    own, best = registered_scores(copies_arr, films, src[:, None])
    assert (own > 0.995).all(), np.sort(own)[:5]
    assert (best == src).all()
    # Other patients' films, registered just as hard, stay well below.
    others = (src + 1 + rng.integers(0, len(films) - 1, len(src))) % len(films)
    assert (others != src).all()
    theirs, _ = registered_scores(copies_arr, films, others[:, None])
    assert np.median(theirs) < 0.97 and (theirs < own).all()
    # Candidates with no index: -inf and -1.
    none, idx = registered_scores(copies_arr[:2], films, np.full((2, 3), -1))
    assert np.isneginf(none).all() and (idx == -1).all()


def test_rotated_probes_find_the_source(films: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    src = rng.choice(len(films), 20, replace=False)
    copies = np.stack([_warp(films[s], rng.choice([-7.0, 7.0]), 1.0, 0.0, 0.0) for s in src])
    cand = rotation_candidates(copies, films, 2)
    assert np.mean([s in c for s, c in zip(src, cand, strict=True)]) >= 0.9


def test_the_check_flags_rotated_copies_in_the_registered_space(films: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    train, holdout = films[:240], films[240:]
    src = rng.choice(len(train), 12, replace=False)
    copies = np.stack(
        [_warp(train[s], rng.choice([-6.0, 6.0]), rng.uniform(0.95, 1.05), 0.05, 2.0) for s in src]
    )
    report = check_memorization(copies, train, holdout, quantile=0.95, batch_figures=False)
    assert report.spaces == ["pixel", "registered"]
    assert report.flagged_by["registered"].all()
    assert report.registered_neighbours is not None
    # The best registration names the source (rarely another film of the same patient).
    assert np.mean(report.registered_neighbours == src) >= 0.9
    plain = check_memorization(
        copies, train, holdout, quantile=0.95, batch_figures=False, register=False
    )
    assert plain.spaces == ["pixel"] and plain.flagged.sum() < report.flagged.sum()
