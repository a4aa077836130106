"""Robust pixel matching (shifts, flips, crops), SSIM, and the two-space memorization check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import load_nih

from synthray.models.gate.correlation import aligned_ssim, robust_correlation
from synthray.models.gate.imageops import ssim
from synthray.models.gate.memorization import (
    _union_thresholds,
    check_memorization,
    pixel_features,
)
from synthray.models.gate.pixelmatch import PixelMatcher


def _smooth_images(n: int, rng: np.random.Generator, r: int = 32) -> np.ndarray:
    coarse = rng.integers(0, 256, size=(n, r // 8, r // 8)).astype(np.float32)
    img = np.kron(coarse, np.ones((8, 8), dtype=np.float32))
    img = torch.nn.functional.avg_pool2d(torch.from_numpy(img)[:, None], 5, 1, 2)[:, 0].numpy()
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _moved(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """img moved down by dy and right by dx, edges replicated."""
    r = img.shape[-1]
    pad = np.pad(img, 4, mode="edge")
    return pad[4 - dy : 4 - dy + r, 4 - dx : 4 - dx + r]


def _naive_best(a: np.ndarray, b: np.ndarray, s: int) -> tuple[float, tuple[int, int], bool]:
    """Max Pearson correlation over shifts and the mirror, by explicit loops."""
    r = a.shape[0]
    best = (-2.0, (0, 0), False)
    for flip in (False, True):
        q = a[:, ::-1] if flip else a
        for dy in range(-s, s + 1):
            for dx in range(-s, s + 1):
                u0, u1, v0, v1 = max(0, -dy), min(r, r - dy), max(0, -dx), min(r, r - dx)
                x = q[u0 + dy : u1 + dy, v0 + dx : v1 + dx].astype(np.float64).ravel()
                y = b[u0:u1, v0:v1].astype(np.float64).ravel()
                c = float(np.corrcoef(x, y)[0, 1])
                if c > best[0] + 1e-9:
                    best = (c, (dy, dx), flip)
    return best


def test_robust_correlation_matches_explicit_loops() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    t = rng.integers(0, 256, (5, 16, 16), dtype=np.uint8)
    t[2] = _moved(q[0], -2, 1)  # q[0][y, x] = t[2][y - 2, x + 1]: shift (2, -1)
    t[4] = _moved(q[1][:, ::-1], 1, -3)  # mirrored, shift (-1, 3)
    cand = np.array([[0, 1, 2, -1, 4], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    ps = robust_correlation(q, t, cand, max_shift=4)
    for i in range(3):
        for j in range(5):
            if cand[i, j] < 0:
                assert ps.correlation[i, j] == -np.inf
                continue
            c, shift, flip = _naive_best(q[i], t[cand[i, j]], 4)
            assert ps.correlation[i, j] == pytest.approx(c, abs=1e-4)
            assert tuple(ps.shift[i, j]) == shift and bool(ps.flip[i, j]) == flip
    assert ps.correlation[0, 2] == pytest.approx(1.0, abs=1e-5) and tuple(ps.shift[0, 2]) == (2, -1)
    assert ps.flip[1, 4] and tuple(ps.shift[1, 4]) == (-1, 3)


def test_template_sizes_undo_a_crop_scaled_back_up() -> None:
    rng = np.random.default_rng(1)
    t = _smooth_images(4, rng, 64)
    crop = t[1, 3:61, 2:60]  # 58 x 58
    zoomed = torch.nn.functional.interpolate(
        torch.from_numpy(crop.astype(np.float32))[None, None], size=(64, 64), mode="bilinear"
    )[0, 0]
    q = zoomed.round().clamp(0, 255).to(torch.uint8).numpy()[None]
    cand = np.array([[0, 1, 2, 3]])
    plain = robust_correlation(q, t, cand)
    zoom = robust_correlation(q, t, cand, sizes=(64, 61, 58))
    assert zoom.correlation[0, 1] > plain.correlation[0, 1]
    assert zoom.correlation[0, 1] > 0.99 and (zoom.scale[0, 1] < 1).all()
    assert int(zoom.correlation[0].argmax()) == 1


def test_anisotropic_templates_undo_a_crop_that_was_not_square() -> None:
    rng = np.random.default_rng(2)
    t = _smooth_images(4, rng, 64)
    crop = t[2, 1:62, 4:62]  # 61 x 58: one edge trimmed more than the other
    zoomed = torch.nn.functional.interpolate(
        torch.from_numpy(crop.astype(np.float32))[None, None], size=(64, 64), mode="bilinear"
    )[0, 0]
    q = zoomed.round().clamp(0, 255).to(torch.uint8).numpy()[None]
    cand = np.array([[0, 1, 2, 3]])
    square = robust_correlation(q, t, cand, sizes=(64, 61, 58))
    pairs = robust_correlation(
        q, t, cand, sizes=[(a, b) for a in (64, 61, 58) for b in (64, 61, 58)]
    )
    assert pairs.correlation[0, 2] > square.correlation[0, 2]
    assert pairs.correlation[0, 2] > 0.995
    assert tuple(np.round(pairs.scale[0, 2] * 64)) == (61, 58)
    m = PixelMatcher(t).match(q, 1, with_ssim=False)
    assert m.neighbours[0, 0] == 2 and tuple(np.round(m.scale[0] * 64)) == (61, 58)


def test_polish_fits_a_crop_between_the_grid_sizes() -> None:
    rng = np.random.default_rng(3)
    t = _smooth_images(4, rng, 64)
    crop = t[1, 2:61, 0:63]  # 59 x 63: between the grid's 58/61 and 61/64
    zoomed = torch.nn.functional.interpolate(
        torch.from_numpy(crop.astype(np.float32))[None, None], size=(64, 64), mode="bilinear"
    )[0, 0]
    q = zoomed.round().clamp(0, 255).to(torch.uint8).numpy()[None]
    rough = PixelMatcher(t, polish=False).match(q, 1, with_ssim=False)
    fine = PixelMatcher(t).match(q, 1, with_ssim=False)
    assert rough.neighbours[0, 0] == fine.neighbours[0, 0] == 1
    assert fine.scores[0, 0] > rough.scores[0, 0]
    assert tuple(np.round(fine.scale[0] * 64)) == (59, 63)


def _naive_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. (2004) MSSIM with the 11x11 Gaussian (sigma 1.5), windows fully inside."""
    t = np.arange(11) - 5
    g = np.exp(-(t**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            x, y = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
            cxy = (w * (x - mx) * (y - my)).sum()
            vals.append(
                (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            )
    return float(np.mean(vals))


def test_ssim_matches_the_definition() -> None:
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 255, (2, 20, 23))
    b = np.clip(a + rng.normal(0, 25, a.shape), 0, 255)
    got = ssim(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    for i in range(2):
        assert float(got[i]) == pytest.approx(_naive_ssim(a[i], b[i]), abs=1e-4)
    same = ssim(torch.from_numpy(a).float(), torch.from_numpy(a).float())
    assert torch.allclose(same, torch.ones(2))
    brighter = ssim(torch.from_numpy(a).float(), torch.from_numpy(a * 0.8 + 30).float())
    assert float(brighter.max()) < 0.99  # SSIM sees luminance and contrast; correlation not


def test_matcher_finds_shifted_flipped_and_cropped_copies() -> None:
    rng = np.random.default_rng(3)
    train = _smooth_images(80, rng, 64)
    queries = np.stack(
        [
            train[5],
            _moved(train[6], 3, -2),
            np.ascontiguousarray(train[7][:, ::-1]),
            np.clip(train[8] * 0.7 + 40, 0, 255).astype(np.uint8),
        ]
    )
    m = PixelMatcher(train).match(queries, 3)
    assert m.neighbours[:, 0].tolist() == [5, 6, 7, 8]
    assert m.scores.shape == (4, 3) and (m.scores[:, 0] > 0.97).all()
    assert tuple(m.shift[1]) == (3, -2) and m.flip.tolist() == [False, False, True, False]
    assert m.ssim is not None and m.ssim[0] == pytest.approx(1.0) and m.ssim[3] < 0.99
    again = aligned_ssim(queries, train, m.neighbours[:, 0], m.shift, m.flip, m.scale)
    assert np.allclose(again, m.ssim)
    own = PixelMatcher(train).match(train[:10], 1, exclude=np.arange(10), with_ssim=False)
    assert (own.neighbours[:, 0] != np.arange(10)).all()


def test_matching_in_query_blocks_changes_nothing() -> None:
    """Queries are matched a block at a time to bound memory; the answer is the same as all
    at once, block edges included (an uneven last block, an ``exclude`` split across blocks)."""
    rng = np.random.default_rng(8)
    train = _smooth_images(40, rng, 32)
    queries = np.concatenate([train[:7], _smooth_images(4, rng, 32)])
    queries[3] = _moved(train[3], 2, -1)
    exclude = np.r_[np.arange(7), np.full(4, -1)]
    whole = PixelMatcher(train, query_block=100).match(queries, 3, exclude=exclude)
    parts = PixelMatcher(train, query_block=3).match(queries, 3, exclude=exclude)
    assert (whole.neighbours[:7, 0] != np.arange(7)).all()
    assert np.array_equal(whole.neighbours, parts.neighbours)
    assert np.allclose(whole.scores, parts.scores, atol=1e-5)
    assert np.array_equal(whole.shift, parts.shift) and np.array_equal(whole.flip, parts.flip)
    assert np.array_equal(whole.scale, parts.scale)
    assert whole.ssim is not None and parts.ssim is not None
    assert np.allclose(whole.ssim, parts.ssim, atol=1e-5)
    assert parts.candidates == pytest.approx(whole.candidates)
    with pytest.raises(ValueError, match="query_block"):
        PixelMatcher(train, query_block=0)


def test_union_thresholds() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=200), rng.normal(size=200)
    single, q = _union_thresholds({"a": a}, 0.95)
    kth = int(np.ceil(201 * 0.95))  # split-conformal rank
    assert single["a"] == np.sort(a)[kth - 1] and q == kth / 200
    both, q2 = _union_thresholds({"a": a, "b": b}, 0.95)
    union = (a > both["a"]) | (b > both["b"])
    assert q2 > q and 0 < union.mean() <= 0.05
    assert (a <= both["a"]).sum() == (b <= both["b"]).sum()  # one common rank


def _planted_batch(rng: np.random.Generator):
    train = _smooth_images(120, rng, 64)
    holdout = _smooth_images(60, rng, 64)
    fresh = _smooth_images(30, rng, 64)
    copies = np.stack(
        [
            train[3],
            _moved(train[10], -4, 2),
            np.ascontiguousarray(train[20][:, ::-1]),
            np.clip(train[30] * 1.2 - 20, 0, 255).astype(np.uint8),
            np.clip(train[40] + rng.normal(0, 10, train[40].shape), 0, 255).astype(np.uint8),
        ]
    )
    return train, holdout, np.concatenate([copies, fresh])


def test_flags_copies_and_reports_evidence() -> None:
    rng = np.random.default_rng(5)
    train, holdout, synthetic = _planted_batch(rng)
    rep = check_memorization(synthetic, train, holdout, quantile=0.95, k=3, register=False)
    assert rep.flagged[:5].all() and rep.neighbours[:, 0][:5].tolist() == [3, 10, 20, 30, 40]
    assert rep.flagged[5:].mean() <= 0.15
    assert rep.spaces == ["pixel"] and list(rep.thresholds) == ["pixel"]
    assert rep.neighbours.shape == (35, 3) and rep.neighbour_similarities.shape == (35, 3)
    assert np.array_equal(rep.neighbour_similarities[:, 0], rep.scores["pixel"])
    assert tuple(rep.best_shift[1]) == (-4, 2) and rep.best_flip[2] and not rep.best_flip[0]
    assert rep.ssim[0] == pytest.approx(1.0) and rep.ssim.shape == (35,)
    assert rep.holdout_scores["pixel"].shape == (60,) and rep.holdout_flagged_fraction <= 0.05
    assert rep.flagged_fraction == pytest.approx(rep.flagged.mean())
    assert 0.0 <= rep.dcr_train_share <= 1.0 and 0.0 <= rep.authenticity <= 1.0
    assert not rep.authentic[0]  # an exact copy is never authentic
    assert rep.embedding_neighbours is None


def test_with_an_embedder_calibrates_the_union() -> None:
    rng = np.random.default_rng(6)
    train, holdout, synthetic = _planted_batch(rng)

    def embedder(images: np.ndarray) -> np.ndarray:  # pooled pixels as a stand-in embedding
        x = torch.from_numpy(images).float()[:, None]
        return pixel_features(
            torch.nn.functional.avg_pool2d(x, 8)[:, 0].round().to(torch.uint8).numpy()
        )

    rep = check_memorization(synthetic, train, holdout, embedder=embedder, k=2, register=False)
    assert rep.spaces == ["pixel", "embedding"]
    assert set(rep.thresholds) == {"pixel", "embedding"} and rep.space_quantile > 0.95
    assert rep.holdout_flagged_fraction <= 0.05
    assert np.array_equal(rep.flagged, rep.flagged_by["pixel"] | rep.flagged_by["embedding"])
    assert rep.embedding_neighbours is not None and rep.embedding_neighbours.shape == (35, 2)
    assert rep.embedding_neighbours[0, 0] == 3 and rep.flagged[:5].all()


def test_authenticity_uses_the_training_images_own_neighbour() -> None:
    """Alaa et al. 2022: j is unauthentic when d(j, i*) < d(i*, NN(i*)), i* = NN(j). The
    reference code looked up NN distances by the synthetic index j; here that would call the
    first image authentic."""
    rng = np.random.default_rng(7)
    base = _smooth_images(3, rng, 32)
    b, a = base[0], base[2]
    b_twin = np.clip(b.astype(np.float32) + rng.normal(0, 2, b.shape), 0, 255).astype(np.uint8)
    train = np.stack([b, b_twin, a])  # b and its twin are close; a is alone
    holdout = _smooth_images(20, rng, 32)
    near_a = np.clip(a.astype(np.float32) + rng.normal(0, 25, a.shape), 0, 255)
    near_b = np.clip(b.astype(np.float32) + rng.normal(0, 25, b.shape), 0, 255)
    synthetic = np.stack([near_a, near_b]).astype(np.uint8)
    rep = check_memorization(synthetic, train, holdout, k=1)
    assert rep.neighbours[:, 0][0] == 2 and rep.neighbours[:, 0][1] in (0, 1)
    assert rep.authentic.tolist() == [False, True]
    assert rep.authenticity == 0.5


def test_input_validation() -> None:
    rng = np.random.default_rng(8)
    a = _smooth_images(4, rng)
    with pytest.raises(ValueError, match="resolution"):
        check_memorization(a, a, _smooth_images(4, rng, 16))
    with pytest.raises(ValueError, match="empty"):
        check_memorization(a, a[:0], a)
    with pytest.raises(ValueError, match="quantile"):
        check_memorization(a, a, a, quantile=0.0)
    with pytest.raises(ValueError, match="empty"):
        check_memorization(a, a, a[:0])
    with pytest.raises(ValueError, match="uint8"):
        check_memorization(a.astype(np.float32), a, a)
    rep = check_memorization(a, a[:2], a, k=3)  # k is capped at the number of train images
    assert rep.neighbours.shape == (4, 2)


def test_fresh_images_are_rarely_flagged() -> None:
    rng = np.random.default_rng(4)
    train = _smooth_images(80, rng)
    holdout = _smooth_images(40, rng)
    fresh = _smooth_images(40, rng)  # same distribution, not copies
    rep = check_memorization(fresh, train, holdout, quantile=0.95)
    assert rep.flagged_fraction <= 0.2
    assert 0.2 <= rep.dcr_train_share <= 0.9


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


def test_the_record_share_compares_patients_not_films() -> None:
    """Synthetic images that are other patients' films are as near the training side as
    the held-out side. A held-out side whose films are mostly one often-imaged patient
    covers less ground, so by film the share rises with nothing memorized; one film per
    patient on each side, as many patients each way, brings it back near 0.5."""
    images, patients = load_nih()
    _, first = np.unique(patients, return_index=True)
    films = images[np.sort(first)]  # one film each of 264 patients
    synthetic, train, pool = films[:80], films[80:180], films[180:]
    rng = np.random.default_rng(6)
    repeats = np.clip(pool[:1].astype(float) + rng.normal(0, 3, (60, 64, 64)), 0, 255)
    holdout = np.concatenate([pool[1:41], repeats.astype(np.uint8)])
    train_keys = np.array([f"t{i}" for i in range(len(train))])
    holdout_keys = np.r_[[f"h{i}" for i in range(40)], np.repeat("often-imaged", 60)]
    by_film = check_memorization(synthetic, train, holdout, register=False)
    # 41 patients a side make one draw noisy (0.44-0.61 over these five seeds): the mean.
    by_patient = [
        check_memorization(
            synthetic,
            train,
            holdout,
            register=False,
            seed=seed,
            train_keys=train_keys,
            holdout_keys=holdout_keys,
        ).dcr_train_share
        for seed in range(5)
    ]
    assert by_film.dcr_train_share > 0.65
    assert 0.4 <= np.mean(by_patient) <= 0.6
    with pytest.raises(ValueError, match="patient key"):
        check_memorization(synthetic, train, holdout, train_keys=train_keys[:5])
