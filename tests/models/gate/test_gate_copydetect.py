"""The learned copy-detection embedding: training, determinism, storage, inference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from synthray.models.checkpoint import ChecksumMismatch
from synthray.models.gate.copydetect import (
    CopyDetectConfig,
    augment,
    embed,
    load,
    save,
    supcon_loss,
    train,
)


def _images(n: int, r: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, r // 8, r // 8)).astype(np.float32)
    img = np.kron(coarse, np.ones((8, 8), dtype=np.float32)) + rng.normal(0, 10, (n, r, r))
    return np.clip(img, 0, 255).astype(np.uint8)


def _tiny(**kw) -> CopyDetectConfig:
    return CopyDetectConfig(**{"resolution": 32, "width": 4, "dim": 16, "batch": 8, **kw})


def test_training_is_deterministic_for_a_seed() -> None:
    images = _images(20)
    keys = np.repeat(np.arange(10), 2)
    a = train(images, keys, _tiny(steps=3), threads=1)
    b = train(images, keys, _tiny(steps=3), threads=1)
    c = train(images, keys, _tiny(steps=3, seed=1), threads=1)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert not all(torch.equal(sa[n], sc[n]) for n in sa)
    assert a.config.steps == 3 and math.isfinite(a.final_loss)


def test_time_budget_records_the_steps_it_ran() -> None:
    res = train(_images(12), None, _tiny(steps=None, max_seconds=0.5), threads=1)
    assert res.config.steps is not None and res.config.steps >= 1
    assert res.model.cfg.steps == res.config.steps


def test_embed_save_and_load(tmp_path: Path) -> None:
    images = _images(12)
    model = train(images, None, _tiny(steps=2), threads=1).model
    e = embed(model, images)
    assert e.shape == (12, 16) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-3)
    path = tmp_path / "cd.safetensors"
    digest = save(path, model, {"dataset": "x"})
    again = load(path, digest)
    assert again.cfg == model.cfg
    assert np.array_equal(embed(again, images), e)
    data = bytearray(path.read_bytes())
    data[-5] ^= 1  # one flipped bit inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch):
        load(path, digest)


def test_contrastive_loss_is_nt_xent_without_patient_keys() -> None:
    """With positives only between the two views of an image, the loss is SimCLR's NT-Xent."""
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(8, 5), dim=1)  # views 0-3 and 4-7 pair up
    source = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    got = supcon_loss(z, source, source, 0.5)
    sim = (z @ z.T / 0.5).double()
    want = 0.0
    for i in range(8):
        j = (i + 4) % 8
        others = [sim[i, a] for a in range(8) if a != i]
        want -= float(sim[i, j] - torch.logsumexp(torch.stack(others), 0))
    assert float(got) == pytest.approx(want / 8, rel=1e-5)
    # A shared patient adds positives and changes the loss.
    group = torch.tensor([0, 0, 2, 3, 0, 0, 2, 3])
    assert float(supcon_loss(z, source, group, 0.5)) != pytest.approx(float(got))


def test_augment_is_seeded_and_in_range() -> None:
    x = torch.rand(6, 1, 32, 32)
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, x)


def test_validation() -> None:
    with pytest.raises(ValueError, match="resolution"):
        CopyDetectConfig(resolution=30)
    with pytest.raises(ValueError, match="batch"):
        CopyDetectConfig(batch=1)
    with pytest.raises(ValueError, match="unknown"):
        CopyDetectConfig.from_dict({"colour": 3})
    with pytest.raises(ValueError, match="uint8"):
        train(np.zeros((4, 16, 16), np.uint8), None, _tiny(steps=1))
    with pytest.raises(ValueError, match="patient_keys"):
        train(_images(4), np.arange(3), _tiny(steps=1))


def test_larger_images_are_embedded_at_the_work_size(tmp_path: Path) -> None:
    """A 64 px dataset's embedding with work_size 32 trains and embeds on 32 px films: a 64 px
    film made of 2 x 2 blocks embeds as its 32 px original does with the same weights."""
    small = _images(12, r=32)
    large = np.kron(small, np.ones((2, 2), dtype=np.uint8))  # (12, 64, 64), area-exact
    model = train(large, None, _tiny(resolution=64, work_size=32, steps=2), threads=1).model
    assert model.cfg.side == 32
    twin = train(small, None, _tiny(steps=1), threads=1).model
    twin.load_state_dict(model.state_dict())  # the weights do not depend on the side
    assert np.allclose(embed(model, large), embed(twin, small), atol=1e-5)
    with pytest.raises(ValueError, match="images must be"):
        embed(model, small)  # it embeds the dataset's resolution, not the work size
    path = tmp_path / "cd.safetensors"
    loaded = load(path, save(path, model))
    assert loaded.cfg.work_size == 32
    assert np.allclose(embed(loaded, large), embed(model, large), atol=1e-6)


def test_a_stored_config_without_work_size_keeps_its_full_resolution() -> None:
    """Embeddings registered before work_size existed were trained on whole films."""
    stored = {k: v for k, v in _tiny(resolution=128).__dict__.items() if k != "work_size"}
    assert CopyDetectConfig.from_dict(stored).side == 128
    assert CopyDetectConfig(resolution=128).side == 64  # new ones work at 64 px
    with pytest.raises(ValueError, match="work_size"):
        CopyDetectConfig(work_size=30)


def test_an_embedding_serves_every_size_it_sees_downsampled(tmp_path: Path) -> None:
    """Trained on 64 px films seen at 32 px, it embeds 128 px films as one trained on them
    would (both reach the network at 32 px); 32 px films, seen undownsampled, keep their own."""
    cfg = _tiny(resolution=64, work_size=32, steps=2)
    assert cfg.serves(128) and not cfg.serves(32) and not cfg.serves(24)
    assert not _tiny(resolution=32, work_size=32).serves(64)  # trained undownsampled
    assert cfg.at(128).resolution == 128 and cfg.at(128).side == 32
    with pytest.raises(ValueError, match="cannot embed 32 px"):
        cfg.at(32)
    mid = _images(12, r=32)
    films = np.kron(mid, np.ones((2, 2), dtype=np.uint8))  # (12, 64, 64)
    model = train(films, None, cfg, threads=1).model
    path = tmp_path / "cd.safetensors"
    digest = save(path, model)
    at_128 = load(path, digest, resolution=128)
    assert at_128.cfg.resolution == 128 and at_128.cfg.side == 32
    larger = np.kron(films, np.ones((2, 2), dtype=np.uint8))  # the same films at 128 px
    assert np.allclose(embed(at_128, larger), embed(model, films), atol=1e-5)
    with pytest.raises(ValueError, match="cannot embed"):
        load(path, digest, resolution=32)
