"""The gate's calibration computed once and reused: same figures, keyed by what it depends on."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_gate_memorization import _planted_batch

from synthray.models.gate import calibration as stored
from synthray.models.gate.copydetect import CopyDetectConfig, CopyDetectNet
from synthray.models.gate.memorization import (
    calibrate,
    calibration_params,
    check_memorization,
    pixel_shift_range,
)


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _planted_batch(np.random.default_rng(11))


@pytest.fixture(scope="module")
def net() -> CopyDetectNet:
    torch.manual_seed(0)
    return CopyDetectNet(CopyDetectConfig(resolution=64)).eval()


def test_a_stored_calibration_gives_the_same_check(batch, net, tmp_path) -> None:
    train, holdout, synthetic = batch
    whole = check_memorization(synthetic, train, holdout, embedder=net, k=1)
    cal = calibrate(train, holdout, embedder=net)
    assert cal.params["spaces"] == ["pixel", "embedding", "registered"]
    stored.save(tmp_path / "c.safetensors", cal)
    again = stored.load(tmp_path / "c.safetensors")
    split = check_memorization(synthetic, train, holdout, embedder=net, k=1, calibration=again)
    assert split.thresholds == whole.thresholds and split.space_quantile == whole.space_quantile
    for name in whole.spaces:
        assert np.array_equal(split.holdout_scores[name], whole.holdout_scores[name])
        assert np.array_equal(split.scores[name], whole.scores[name])
    assert np.array_equal(split.flagged, whole.flagged) and split.flagged[:5].all()
    assert split.holdout_flagged_fraction == whole.holdout_flagged_fraction
    # The batch figures are the same too.
    assert np.array_equal(split.authentic, whole.authentic)
    assert split.authenticity == whole.authenticity < 1.0
    assert split.dcr_train_share == whole.dcr_train_share


def test_checks_fill_in_the_training_side_for_later_checks(batch, net, tmp_path) -> None:
    """The authenticity figure's training-side searches a check made are kept in the
    calibration: stored and read back, a later check finds them and reaches the same
    figures; what it lacks it computes and adds."""
    train, holdout, synthetic = batch
    cal = calibrate(train, holdout, embedder=net)
    assert stored.missing(cal) == len(train)  # nothing computed at calibration
    first = check_memorization(synthetic[:10], train, holdout, embedder=net, calibration=cal)
    filled = len(train) - stored.missing(cal)
    assert filled == len(np.unique(first.neighbours[:, 0]))
    stored.save(tmp_path / "c.safetensors", cal)
    again = stored.load(tmp_path / "c.safetensors")
    assert stored.missing(again) == stored.missing(cal)
    rest = check_memorization(synthetic, train, holdout, embedder=net, calibration=again)
    whole = check_memorization(synthetic, train, holdout, embedder=net)
    assert np.array_equal(rest.authentic, whole.authentic)
    assert stored.missing(again) < stored.missing(cal)
    known = ~np.isnan(again.train_nearest_other)
    own = calibrate(train, holdout, embedder=net)
    check_memorization(train, train, holdout, embedder=net, calibration=own, k=1)
    # Every entry equals the training image's own nearest-other search, however filled, up
    # to float rounding: the searches ran in batches of other sizes, whose matrix products
    # round differently on some CPUs (one entry differed by 1.5e-7 on an AVX-512 EPYC).
    np.testing.assert_allclose(
        again.train_nearest_other[known], own.train_nearest_other[known], rtol=0, atol=1e-5
    )


def test_a_calibration_for_other_settings_is_refused(batch, net) -> None:
    train, holdout, synthetic = batch
    cal = calibrate(train, holdout, embedder=net, register=False)
    with pytest.raises(ValueError, match="calibration"):
        check_memorization(synthetic, train, holdout, embedder=net, calibration=cal)
    with pytest.raises(ValueError, match="calibration"):  # another training set
        check_memorization(
            synthetic, train[1:], holdout, embedder=net, register=False, calibration=cal
        )
    with pytest.raises(ValueError, match="calibration"):  # no embedder now
        check_memorization(synthetic, train, holdout, register=False, calibration=cal)


def test_the_key_changes_with_every_input(batch) -> None:
    train, holdout, _ = batch
    params = calibration_params(train, holdout, "net", 4, True)
    key = stored.cache_key(train, holdout, "a" * 64, params)
    assert key == stored.cache_key(train.copy(), holdout.copy(), "a" * 64, dict(params))
    moved = holdout.copy()
    moved[0, 0, 0] ^= 1  # one grey level of one held-out pixel
    assert stored.cache_key(train, moved, "a" * 64, params) != key
    assert stored.cache_key(holdout, train, "a" * 64, params) != key  # roles swapped
    assert stored.cache_key(train, holdout, "b" * 64, params) != key  # another embedding
    other = calibration_params(train, holdout, "net", 3, True)
    assert stored.cache_key(train, holdout, "a" * 64, other) != key


def test_cached_computes_once_and_survives_a_damaged_file(batch, tmp_path) -> None:
    train, holdout, _ = batch
    calls = []

    def compute():
        calls.append(1)
        return calibrate(train, holdout, register=False)

    first, reused = stored.cached(tmp_path, "k1", compute)
    assert not reused and len(calls) == 1
    second, reused = stored.cached(tmp_path, "k1", compute)
    assert reused and len(calls) == 1 and second.train_embeddings is None
    assert np.array_equal(second.holdout_scores["pixel"], first.holdout_scores["pixel"])
    assert [p.name for p in tmp_path.iterdir()] == ["k1.safetensors"]  # no temporary file left
    (tmp_path / "k1.safetensors").write_bytes(b"not a safetensors file")
    third, reused = stored.cached(tmp_path, "k1", compute)
    assert not reused and len(calls) == 2
    assert np.array_equal(third.holdout_scores["pixel"], first.holdout_scores["pixel"])
    assert stored.load(tmp_path / "k1.safetensors").params == first.params


def test_the_shift_search_scales_with_the_resolution() -> None:
    assert [pixel_shift_range(r) for r in (32, 64, 128, 256)] == [4, 4, 8, 16]


def test_the_cache_keeps_the_most_recently_used(batch, tmp_path) -> None:
    train, holdout, _ = batch
    cal = calibrate(train[:40], holdout[:20], register=False)
    for i, key in enumerate(("a", "b", "c")):
        stored.cached(tmp_path, key, lambda: cal)
        os.utime(tmp_path / f"{key}.safetensors", (1000.0 + i, 1000.0 + i))
    stale = tmp_path / ".a.safetensors.x1.tmp"  # an interrupted write, hours old
    stale.write_bytes(b"partial")
    os.utime(stale, (1000.0, 1000.0))
    fresh = tmp_path / ".b.safetensors.x2.tmp"  # a write in progress
    fresh.write_bytes(b"partial")
    _, reused = stored.cached(tmp_path, "a", lambda: cal)  # a read marks "a" as used
    assert reused
    _, reused = stored.cached(tmp_path, "d", lambda: cal, keep=2)
    assert not reused
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".b.safetensors.x2.tmp", "a.safetensors", "d.safetensors"]
