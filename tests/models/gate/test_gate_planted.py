"""Acceptance: planted copies among realistic synthetic stand-ins, on real radiographs.

NIH ChestX-ray14 (64x64), split by patient: exact copies and perturbed copies of training images
(noise, 1-4 px shifts, brightness/contrast, a small crop scaled back up, a horizontal flip, small
affine transforms (rotation, scale, shear), mild elastic deformation, resampling, JPEG, blur,
and random combinations of two to four of these), every parameter drawn at random, are
hidden in a batch of stand-ins that are not copies (held-out images blurred and noised, and
mixtures of three training images) and of real held-out images that calibrated nothing. Kermany
paediatric radiographs: each group of near-duplicate films (pixel correlation > 0.99) has one
member in train and the others checked. Run with ``-s`` to see the rates.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import SHARED_DATA, load_nih

from synthray.models.gate.copydetect import CopyDetectConfig, train
from synthray.models.gate.memorization import check_memorization, pixel_features
from synthray.models.gate.pixelmatch import PixelMatcher
from synthray.models.gate.planted import FAMILIES, plant
from synthray.models.gate.search import ExactIndex

# Acceptance tests on whole reference sets: minutes, not seconds (left out of `make test-fast`).
pytestmark = pytest.mark.slow

PER_KIND = 30
# Copy-detection embedding steps: about what the demo's 60 s buy on a 2-core fp32 CPU (NIH,
# the demo's data), and what the gate job's default 300 s buy there (Kermany).
DEMO_STEPS, DEFAULT_STEPS = 160, 800


def _patient_split(patients: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Boolean mask of the images whose patient falls in the held-out ``share``."""
    unique = np.array(sorted(set(patients.tolist())))
    order = np.random.default_rng(seed).permutation(len(unique))
    held = set(unique[order[: round(share * len(unique))]].tolist())
    return np.array([p in held for p in patients])


def _blurred_noisy(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    im = Image.fromarray(img).resize((16, 16), Image.BILINEAR).resize(img.shape, Image.BICUBIC)
    x = np.asarray(im, dtype=np.float32) + rng.normal(0, 12, img.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def kermany() -> tuple[np.ndarray, np.ndarray]:
    """The Kermany training folder at 64 px and its patient keys, decoded once."""
    return _load_kermany()


def test_planted_copies_in_nih_are_caught() -> None:
    images, patients = load_nih()
    _planted(images, patients, "NIH", time.perf_counter(), DEMO_STEPS, min_detected=0.99)


# It trains the copy-detection embedding and checks 360 copies against about 4,700 films:
# 75 s on a Xeon, but close to the suite's 600 s per test on a 2-core Zen 3 (AVX2, fp32),
# where one CI run passed it and the next, with other work on the cores, timed out.
@pytest.mark.timeout(1200)
def test_planted_copies_in_kermany_are_caught(kermany: tuple[np.ndarray, np.ndarray]) -> None:
    """The same planted test on the whole Kermany training folder (5,216 films)."""
    images, patients = kermany
    _planted(images, patients, "Kermany", time.perf_counter(), DEFAULT_STEPS, min_detected=0.99)


def _planted(
    images: np.ndarray,
    patients: np.ndarray,
    name: str,
    t0: float,
    steps: int,
    min_detected: float,
) -> None:
    held = _patient_split(patients, 0.2, seed=0)
    train_x, train_p = images[~held], patients[~held]
    # Half of the held-out patients calibrate; the other half are real images never seen.
    cal_mask = _patient_split(patients[held], 0.5, seed=1)
    cal_x, eval_x = images[held][cal_mask], images[held][~cal_mask]

    planted = plant(train_x, PER_KIND, seed=2)
    copies, sources = planted.copies, planted.sources
    rng = np.random.default_rng(3)
    blurred = np.stack([_blurred_noisy(img, rng) for img in eval_x[:30]])
    mix = rng.choice(len(train_x), (30, 3))
    mixtures = np.round(train_x[mix].astype(np.float32).mean(axis=1)).astype(np.uint8)
    synthetic = np.concatenate([copies, blurred, mixtures, eval_x])
    n_copies, n_stand = len(copies), len(blurred) + len(mixtures)

    t1 = time.perf_counter()
    model = train(train_x, train_p, CopyDetectConfig(steps=steps, seed=0), threads=1).model
    t2 = time.perf_counter()
    rep = check_memorization(synthetic, train_x, cal_x, quantile=0.95, embedder=model, k=3)
    t3 = time.perf_counter()

    caught = rep.flagged[:n_copies]
    # The nearest training image is the source, or a near-duplicate of it (Kermany holds
    # follow-up films of one patient that correlate > 0.99): a copy of one copies both.
    nearest = rep.neighbours[:, 0][:n_copies]
    twin = PixelMatcher(train_x[sources]).match(train_x[nearest], 1, with_ssim=False)
    twin_of = (twin.neighbours[:, 0] == np.arange(n_copies)) & (twin.scores[:, 0] > 0.99)
    registered = rep.registered_neighbours[:n_copies]
    right = (nearest == sources) | twin_of | (registered == sources)
    real = rep.flagged[n_copies + n_stand :]
    print(
        f"\n{name}: train {len(train_x)}, calibration {len(cal_x)}, held-out checked {len(eval_x)}"
    )
    for i, kind in enumerate(FAMILIES):
        sl = slice(i * PER_KIND, (i + 1) * PER_KIND)
        print(
            f"  {kind:20} detected {caught[sl].mean():6.1%}  right train index "
            f"{right[sl].mean():6.1%}  pixel {np.median(rep.scores['pixel'][sl]):.4f}  "
            f"SSIM {np.median(rep.ssim[sl]):.3f}"
        )
    print(f"  all copies           detected {caught.mean():6.1%} ({caught.sum()}/{n_copies})")
    print(f"  real held-out images flagged {real.mean():6.1%} ({real.sum()}/{len(real)})")
    print(
        f"  stand-ins flagged: blurred+noised {rep.flagged[n_copies : n_copies + 30].mean():.1%},"
        f" 3-image mixtures {rep.flagged[n_copies + 30 : n_copies + 60].mean():.1%}"
    )
    print(
        f"  thresholds {rep.thresholds} (per-space quantile {rep.space_quantile:.3f}); "
        f"dcr_train_share {rep.dcr_train_share:.3f}; authenticity {rep.authenticity:.3f}"
    )
    print(
        f"  load {t1 - t0:.1f} s, copy-detect training {t2 - t1:.1f} s ({steps} steps), "
        f"check {t3 - t2:.1f} s"
    )

    assert caught.mean() >= min_detected
    # A caught copy names its source (or a near-duplicate of it) as its nearest image.
    assert right[caught].mean() >= 0.97
    assert real.mean() <= 0.07  # quantile 0.95: about 5 % of new real images, plus slack
    flagged = np.flatnonzero(rep.flagged)
    assert (rep.neighbours[flagged] >= 0).all()
    assert np.isfinite(rep.neighbour_similarities[flagged]).all()
    assert (rep.embedding_neighbours[flagged] >= 0).all()


def _kermany_dir() -> Path:
    path = SHARED_DATA / "kermany-224"
    if not (path / "labels.csv").is_file():
        pytest.fail(f"reference data missing at {path} (set SYNTHRAY_TEST_DATA)")
    return path


def _load_kermany() -> tuple[np.ndarray, np.ndarray]:
    folder = _kermany_dir()
    images, keys = [], []
    with (folder / "labels.csv").open(newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            with Image.open(folder / row["file"]) as im:
                im.draft("L", (64, 64))  # JPEG decodes at reduced scale
                images.append(np.asarray(im.convert("L").resize((64, 64), Image.BILINEAR)))
            keys.append(row["patient_key"])
    return np.stack(images).astype(np.uint8), np.array(keys)


def _duplicate_groups(images: np.ndarray) -> tuple[list[list[int]], int]:
    """Groups of images with pixel correlation > 0.99 (connected components), and #pairs."""
    f = pixel_features(images)
    sims, idx = ExactIndex(f).search(f, 4, exclude_self=True)
    pairs = {
        (min(i, int(j)), max(i, int(j)))
        for i in range(len(images))
        for j, s in zip(idx[i], sims[i], strict=True)
        if s > 0.99
    }
    parent = list(range(len(images)))

    def root(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in pairs:
        parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for a, b in pairs:
        for v in (a, b):
            groups.setdefault(root(v), [])
            if v not in groups[root(v)]:
                groups[root(v)].append(v)
    return [sorted(g) for g in groups.values()], len(pairs)


def test_kermany_near_duplicates_are_found_and_flagged(
    kermany: tuple[np.ndarray, np.ndarray],
) -> None:
    t0 = time.perf_counter()
    images, keys = kermany
    groups, n_pairs = _duplicate_groups(images)
    assert n_pairs == 28  # the set's documented near-duplicate pairs, found at 64x64
    in_group = {v for g in groups for v in g}
    dup_patients = {keys[v] for v in in_group}

    rng = np.random.default_rng(0)
    free = np.array([k not in dup_patients for k in keys])
    held = free & _patient_split(keys, 0.2, seed=0)
    kept = [g[0] for g in groups]  # one member of each group trains; the others are checked
    checked = [v for g in groups for v in g[1:]]
    others = np.flatnonzero(~held & ~np.isin(np.arange(len(keys)), list(in_group)))
    train_idx = np.concatenate([kept, rng.choice(others, 1000, replace=False)])
    # Held-out patients: half calibrate, the other half are real images checked as if synthetic.
    held_idx = np.flatnonzero(held)
    cal_mask = _patient_split(keys[held_idx], 0.5, seed=1)
    cal_idx, eval_idx = held_idx[cal_mask], held_idx[~cal_mask]
    synthetic = images[np.concatenate([checked, eval_idx])]

    t1 = time.perf_counter()
    rep = check_memorization(
        synthetic, images[train_idx], images[cal_idx], k=3, batch_figures=False
    )
    t2 = time.perf_counter()

    n = len(checked)
    expected = np.array([train_idx.tolist().index(g[0]) for g in groups for _ in g[1:]])
    found = rep.neighbours[:, 0][:n] == expected
    real = rep.flagged[n:]
    print(
        f"\nKermany: {n_pairs} near-duplicate pairs in {len(groups)} groups; {n} films checked "
        f"against {len(train_idx)} training images: nearest neighbour right {found.mean():.0%}, "
        f"flagged {rep.flagged[:n].mean():.0%} (correlation min "
        f"{rep.scores['pixel'][:n].min():.4f}, threshold {rep.thresholds['pixel']:.4f}); "
        "real held-out "
        f"flagged {real.mean():.1%} ({real.sum()}/{len(real)}, calibrated on {len(cal_idx)}); "
        f"load+pairs {t1 - t0:.1f} s, "
        f"check {t2 - t1:.1f} s"
    )
    assert found.all()
    assert rep.flagged[:n].all()
    assert real.mean() <= 0.07
