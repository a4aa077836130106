"""Planted copies: every family alters a real film and stays a copy of it; the rates and
their intervals are right."""

from __future__ import annotations

import numpy as np
import pytest
from support import load_nih

from synthray.models.gate.pixelmatch import PixelMatcher
from synthray.models.gate.planted import FAMILIES, detection, perturb, plant, wilson


@pytest.mark.parametrize("resolution", [64, 128])
def test_every_family_alters_the_film_and_stays_its_copy(resolution: int) -> None:
    from PIL import Image

    images, _ = load_nih()
    films = np.stack(
        [
            np.asarray(Image.fromarray(f).resize((resolution, resolution), Image.BICUBIC))
            for f in images[:16]
        ]
    )
    rng = np.random.default_rng(0)
    copies, sources, families = [], [], []
    for family in FAMILIES:
        for i, film in enumerate(films):
            copy = perturb(family, film, rng)
            assert copy.shape == film.shape and copy.dtype == np.uint8
            assert np.array_equal(copy, film) == (family == "exact"), family
            copies.append(copy)
            sources.append(i)
            families.append(family)
    # Still copies of their films: the gate's shift-, crop- and flip-robust correlation
    # names the source as the nearest of the 16 films for nearly every one (the few
    # rotated or warped exceptions are what the gate's registered space is for).
    found = PixelMatcher(films).match(np.stack(copies), 1, with_ssim=False).neighbours[:, 0]
    right = found == np.array(sources)
    assert right.mean() >= 0.95
    wrong = {f for f, ok in zip(families, right, strict=True) if not ok}
    assert wrong <= {"affine", "elastic", "combined"}, wrong


def test_parameters_are_drawn_per_copy_and_reproducible() -> None:
    images, _ = load_nih()
    a = plant(images[:50], per_family=3, seed=4)
    b = plant(images[:50], per_family=3, seed=4)
    assert np.array_equal(a.copies, b.copies) and np.array_equal(a.sources, b.sources)
    assert len(a.copies) == 3 * len(FAMILIES) and len(set(a.sources.tolist())) == len(a.sources)
    # Two noise copies of one film differ: the noise level is drawn for each copy.
    rng = np.random.default_rng(1)
    film = images[0]
    first, second = perturb("noise", film, rng), perturb("noise", film, rng)
    assert not np.array_equal(first, second)
    with pytest.raises(ValueError, match="unknown family"):
        perturb("rotate", film, rng)


def test_detection_per_family_with_wilson_intervals() -> None:
    families = np.array(["exact"] * 4 + ["blur"] * 4)
    flagged = np.array([1, 1, 1, 1, 1, 0, 1, 0], bool)
    d = detection(flagged, families, goal=0.99)
    assert d["planted"] == 8 and d["caught"] == 6 and d["rate"] == 0.75 and not d["met"]
    assert d["per_family"] == {
        "exact": {"planted": 4, "caught": 4, "rate": 1.0},
        "blur": {"planted": 4, "caught": 2, "rate": 0.5},
    }
    # Wilson's interval for 6 of 8 (a textbook value: 0.409 to 0.929).
    assert wilson(6, 8) == pytest.approx([0.4093, 0.9285], abs=1e-3)
    assert wilson(8, 8)[1] == 1.0 and wilson(0, 8)[0] == 0.0
    assert detection(np.ones(200, bool), np.array(["exact"] * 200))["met"]
