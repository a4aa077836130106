"""Offline quality metrics: known answers on synthetic features, and a real encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from synthray.models.checkpoint import ChecksumMismatch
from synthray.models.evaluation.quality import (
    EncoderConfig,
    evaluate,
    fid,
    kid,
    load_encoder,
    precision_recall,
    save_encoder,
    train_encoder,
)


def test_fid_known_values() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    b = rng.normal(size=(4000, 8))
    assert fid(a, b) == pytest.approx(0.0, abs=0.05)
    # Same covariance, mean shifted by 2 along one axis: FID = 4.
    assert fid(a, b + np.eye(8)[0] * 2) == pytest.approx(4.0, abs=0.15)
    # Scaled by 2: Tr(S + 4S - 2*2S) = Tr(S) = 8 for unit covariance.
    assert fid(a, 2 * b) == pytest.approx(8.0, abs=0.4)


def test_kid_and_precision_recall() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    far = rng.normal(size=(600, 16)) + 10
    assert abs(kid(a, b, subsets=10, subset_size=300)) < 0.02
    assert kid(a, far, subsets=10, subset_size=300) > 1.0
    p, r = precision_recall(a, b)
    assert p > 0.6 and r > 0.6  # k-NN manifolds are conservative in 16 dimensions
    p, r = precision_recall(a, far)
    assert p == 0.0 and r == 0.0
    # Mode collapse: all generated samples at one real point -> precision high, recall ~0.
    collapsed = np.repeat(a[:1], 600, axis=0) + rng.normal(scale=1e-3, size=(600, 16))
    p, r = precision_recall(a, collapsed)
    assert p == 1.0 and r < 0.05


def test_encoder_round_trip_and_evaluate(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    # Two classes a classifier can tell apart: bright top half vs bright bottom half.
    n = 64
    imgs = rng.integers(0, 60, size=(n, 32, 32), dtype=np.uint8)
    labels = np.arange(n) % 2
    imgs[labels == 0, :16] += 150
    imgs[labels == 1, 16:] += 150
    cfg = EncoderConfig(resolution=32, num_classes=2, width=8, feat_dim=16)
    model = train_encoder(imgs, labels, cfg, max_steps=40, max_seconds=30, batch_size=16)
    sha = save_encoder(tmp_path / "enc.safetensors", model)
    again = load_encoder(tmp_path / "enc.safetensors", sha)
    with pytest.raises(ChecksumMismatch):
        load_encoder(tmp_path / "enc.safetensors", "0" * 64)
    out = evaluate(
        again,
        imgs[:48],
        labels[:48],
        imgs[48:],
        labels[48:],
        imgs[48:],
        labels[48:],
        ["top", "bottom"],
    )
    assert out["encoder_holdout_accuracy"] >= 0.9
    assert set(out["overall"]) == {"generated", "floor"}
    # Generated == holdout here, so the generated figures equal the floor.
    assert out["overall"]["generated"]["fid"] == pytest.approx(out["overall"]["floor"]["fid"])
