"""The pixel-space nearest-neighbour memorization check, on real computations."""

from __future__ import annotations

import numpy as np
import pytest

from synthray.models.gate.memorization import check_memorization, nearest_neighbours, pixel_features


def _smooth_images(n: int, rng: np.random.Generator, r: int = 32) -> np.ndarray:
    """Blurry random images, which correlate with each other somewhat, like radiographs do."""
    coarse = rng.integers(0, 256, size=(n, r // 8, r // 8)).astype(np.float32)
    img = np.kron(coarse, np.ones((8, 8), dtype=np.float32))
    img += rng.normal(0, 20, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_pixel_features_are_pearson_correlations() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 16, 16), dtype=np.uint8)
    images[4] = 77  # constant image
    f = pixel_features(images)
    assert f.shape == (5, 256) and f.dtype == np.float32
    assert np.isfinite(f).all()
    assert np.allclose(np.linalg.norm(f[:4], axis=1), 1.0, atol=1e-5)
    assert not f[4].any()
    expected = np.corrcoef(images[:4].reshape(4, -1).astype(np.float64))
    assert np.allclose(f[:4] @ f[:4].T, expected, atol=1e-5)


@pytest.mark.parametrize("block", [7, 4096])
def test_nearest_neighbours_match_brute_force(block: int) -> None:
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(300, 24)).astype(np.float32)
    queries = rng.normal(size=(50, 24)).astype(np.float32)
    sims, idx = nearest_neighbours(queries, refs, k=4, block=block)
    full = queries.astype(np.float64) @ refs.astype(np.float64).T  # (Q, M)
    assert sims.shape == (50, 4) and sims.dtype == np.float32 and idx.dtype == np.int64
    assert np.array_equal(idx[:, 0], full.argmax(axis=1))
    assert np.array_equal(idx, np.argsort(-full, axis=1)[:, :4])
    assert np.allclose(sims, np.take_along_axis(full, idx, axis=1), atol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all()


@pytest.mark.parametrize("block", [5, 4096])
def test_exclude_self(block: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, idx_self = nearest_neighbours(x, x, k=1, block=block)
    assert np.array_equal(idx_self[:, 0], np.arange(40))
    _, idx = nearest_neighbours(x, x, k=2, block=block, exclude_self=True)
    full = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(full, -np.inf)
    assert np.array_equal(idx, np.argsort(-full, axis=1)[:, :2])


def test_nearest_neighbours_accepts_read_only_input() -> None:
    x = np.eye(4, dtype=np.float32)
    x.setflags(write=False)
    _, idx = nearest_neighbours(x, x, k=1)
    assert idx[:, 0].tolist() == [0, 1, 2, 3]


def test_copies_are_flagged_and_noise_is_not() -> None:
    rng = np.random.default_rng(3)
    train = _smooth_images(60, rng)
    holdout = _smooth_images(30, rng)
    exact = train[[3, 10]]
    shifted = np.clip(train[[20]].astype(np.float32) * 0.7 + 40, 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, size=(4, 32, 32), dtype=np.uint8)
    synthetic = np.concatenate([exact, shifted, noise])
    report = check_memorization(synthetic, train, holdout, quantile=0.95, k=3)

    assert report.flagged.tolist() == [True, True, True, False, False, False, False]
    assert report.neighbours[:3, 0].tolist() == [3, 10, 20]
    assert report.similarities[:2] == pytest.approx(1.0, abs=1e-5)
    assert report.similarities[2] > 0.99
    assert report.neighbours.shape == (7, 3) and report.neighbour_similarities.shape == (7, 3)
    assert np.array_equal(report.similarities, report.neighbour_similarities[:, 0])
    assert len(report.holdout_nn_similarity) == 30
    assert report.threshold == pytest.approx(np.quantile(report.holdout_nn_similarity, 0.95))
    assert report.flagged_fraction == pytest.approx(3 / 7)
    assert 0.0 <= report.dcr_train_share <= 1.0


def test_fresh_images_are_rarely_flagged() -> None:
    rng = np.random.default_rng(4)
    train = _smooth_images(80, rng)
    holdout = _smooth_images(40, rng)
    fresh = _smooth_images(40, rng)  # same distribution, not copies
    report = check_memorization(fresh, train, holdout, quantile=0.95)
    assert report.flagged_fraction <= 0.2
    assert 0.2 <= report.dcr_train_share <= 0.9


def test_input_validation() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    with pytest.raises(ValueError, match="resolution"):
        check_memorization(a, a, rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        check_memorization(a, a[:0], a)
    with pytest.raises(ValueError, match="empty"):
        check_memorization(a, a, a[:0])
    with pytest.raises(ValueError, match="uint8"):
        check_memorization(a.astype(np.float32), a, a)
    report = check_memorization(a, a[:2], a, k=3)  # k is capped at the number of train images
    assert report.neighbours.shape == (3, 2)
