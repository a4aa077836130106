"""Planted copies: how often the memorization gate catches altered copies of a site's own
training films.

A generator that memorizes rarely returns a film pixel for pixel; it returns it shifted,
warped, re-exposed, resampled or a little noisy. Each family below alters a training film
the way a generator or a partner plausibly could, every parameter drawn at random for each
copy (never from a fixed list). The gate then checks the copies against the training set
like any synthetic batch, and the share it flags is the detection rate per family.

Geometric parameters are stated for 64 px films and scale with the resolution, so that a
copy at 128 px is altered as much, relative to the film, as one at 64 px.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

EDITS = (
    "noise",
    "shift",
    "brightness/contrast",
    "crop+rescale",
    "flip",
    "affine",
    "elastic",
    "resample",
    "jpeg",
    "blur",
)
FAMILIES = ("exact", *EDITS, "combined")  # combined: two to four edits in a random order
RESAMPLERS = (
    Image.Resampling.NEAREST,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.LANCZOS,
)


def _sample_xy(img: np.ndarray, src_y: np.ndarray, src_x: np.ndarray) -> np.ndarray:
    """Bilinear resampling of ``img`` at the given source coordinates, edges repeated."""
    return ndimage.map_coordinates(img.astype(np.float32), [src_y, src_x], order=1, mode="nearest")


def _affine(img: np.ndarray, rng: np.random.Generator, px: float) -> np.ndarray:
    """Rotation up to 6 degrees, scale 0.94-1.06, shear up to 0.06 and a shift up to 3 px
    (at 64 px), about the centre."""
    r = img.shape[0]
    a = np.deg2rad(rng.uniform(-6, 6))
    s, k = rng.uniform(0.94, 1.06), rng.uniform(-0.06, 0.06)
    m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1, k], [0, 1]])
    m = m / s  # output -> input coordinates
    c = (r - 1) / 2
    t = np.array([c, c]) - m @ np.array([c, c]) + rng.uniform(-3, 3, 2) * px
    ys, xs = np.mgrid[0:r, 0:r].astype(np.float32)
    return _sample_xy(img, m[1, 0] * xs + m[1, 1] * ys + t[1], m[0, 0] * xs + m[0, 1] * ys + t[0])


def _elastic(img: np.ndarray, rng: np.random.Generator, px: float) -> np.ndarray:
    """A smooth random displacement of 1-2.5 px peak at 64 px (a 4 x 4 grid of offsets,
    upsampled)."""
    r = img.shape[0]
    amp = rng.uniform(1.0, 2.5) * px
    coarse = rng.normal(0, 1, (2, 4, 4))
    field = np.stack([ndimage.zoom(c, r / 4, order=3) for c in coarse])[:, :r, :r]
    field *= amp / max(float(np.abs(field).max()), 1e-6)
    ys, xs = np.mgrid[0:r, 0:r].astype(np.float32)
    return _sample_xy(img, ys + field[0], xs + field[1])


def perturb(kind: str, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``img`` (uint8, square) altered by one family, parameters from ``rng``."""
    if kind not in FAMILIES:
        raise ValueError(f"unknown family {kind!r}; known: {', '.join(FAMILIES)}")
    r = img.shape[0]
    px = r / 64
    x: np.ndarray = img.astype(np.float32)
    if kind == "combined":
        for edit in rng.choice(EDITS, size=int(rng.integers(2, 5)), replace=False):
            img = perturb(str(edit), img, rng)
        return img
    if kind == "affine":
        x = _affine(img, rng, px)
    elif kind == "elastic":
        x = _elastic(img, rng, px)
    elif kind == "resample":
        small = max(8, round(r * rng.uniform(0.4, 0.8)))
        filt = RESAMPLERS[rng.integers(4)]
        down = Image.fromarray(img).resize((small, small), filt)
        x = np.asarray(down.resize((r, r), Image.Resampling.BICUBIC), dtype=np.float32)
    elif kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(25, 91)))
        x = np.asarray(Image.open(buf), dtype=np.float32)
    elif kind == "blur":
        x = ndimage.gaussian_filter(x, rng.uniform(0.5, 1.5) * px)
    elif kind == "noise":
        x = x + rng.normal(0, rng.uniform(5, 15), x.shape)
    elif kind == "shift":
        most = max(1, round(4 * px))
        dy, dx = 0, 0
        while max(abs(dy), abs(dx)) == 0:
            dy, dx = (int(v) for v in rng.integers(-most, most + 1, 2))
        x = np.pad(x, most, mode="edge")[most - dy : most - dy + r, most - dx : most - dx + r]
    elif kind == "brightness/contrast":
        x = x * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)
    elif kind == "crop+rescale":
        top, bottom, left, right = (int(v) for v in rng.integers(1, max(2, round(5 * px)), 4))
        part = Image.fromarray(img[top : r - bottom, left : r - right])
        x = np.asarray(part.resize((r, r), Image.Resampling.BILINEAR), dtype=np.float32)
    elif kind == "flip":
        x = x[:, ::-1]
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Planted:
    copies: np.ndarray  # uint8 (F * per_family, R, R)
    families: np.ndarray  # (N,) family name of each copy
    sources: np.ndarray  # (N,) index of the training film each copies


def plant(train: np.ndarray, per_family: int, seed: int = 0) -> Planted:
    """``per_family`` altered copies of distinct training films for every family (fewer
    films than copies: films are reused)."""
    rng = np.random.default_rng(seed)
    n = len(FAMILIES) * per_family
    sources = rng.choice(len(train), n, replace=n > len(train))
    families = np.repeat(np.array(FAMILIES), per_family)
    copies = np.stack(
        [perturb(str(f), train[s], rng) for f, s in zip(families, sources, strict=True)]
    )
    return Planted(copies, families, sources)


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval (95% by default) of a rate of ``k`` in ``n``."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def detection(
    flagged: np.ndarray, families: Sequence[str] | np.ndarray, goal: float = 0.99
) -> dict[str, Any]:
    """Detection per family and over all copies, with Wilson intervals, against ``goal``."""
    flagged = np.asarray(flagged, dtype=bool)
    families = np.asarray(families)
    per_family = {}
    for f in dict.fromkeys(families.tolist()):
        mine = families == f
        k, n = int(flagged[mine].sum()), int(mine.sum())
        per_family[f] = {"planted": n, "caught": k, "rate": round(k / n, 4)}
    k, n = int(flagged.sum()), len(flagged)
    return {
        "planted": n,
        "caught": k,
        "rate": round(k / n, 4) if n else None,
        "interval_95": wilson(k, n),
        "goal": goal,
        "met": bool(n and k / n >= goal),
        "per_family": per_family,
    }
