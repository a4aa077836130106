"""The training loop with architecture="projgan": EMA, DiffAugment, resume, files, sampling."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from synthray.models import projgan
from synthray.models.checkpoint import ChecksumMismatch, load_state, save_state
from synthray.models.gan.config import TrainConfig
from synthray.models.gan.dcgan import Generator as DCGANGenerator
from synthray.models.gan.files import load_generator, save_generator
from synthray.models.gan.sampling import sample_images
from synthray.models.gan.trainer import train_gan


def _data(n: int = 24, resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, resolution, resolution), dtype=np.uint8)
    labels = np.array([0] * (n - 4) + [1] * 4, dtype=np.int64)
    return images, labels


def _cfg(**overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "architecture": "projgan",
        "class_names": ["normal", "pneumonia"],
        "batch_size": 8,
        "g_channels": 4,
        "d_channels": 4,
        "max_steps": 3,
        "device": "cpu",
        "checkpoint_every_s": 0.0,
    }
    base.update(overrides)
    return TrainConfig(**base)


def _assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_architecture_defaults_are_resolved_and_recorded() -> None:
    dcgan = TrainConfig(class_names=["a"], max_steps=1)
    assert (dcgan.g_channels, dcgan.d_channels, dcgan.augment, dcgan.ema_decay) == (
        64,
        64,
        "none",
        0.0,
    )
    pg = TrainConfig(architecture="projgan", class_names=["a"], max_steps=1)
    assert (pg.g_channels, pg.d_channels, pg.augment, pg.ema_decay, pg.class_power) == (
        32,
        64,
        "color,translation,cutout",
        0.999,
        0.5,
    )
    assert dcgan.class_power == 0.0
    assert TrainConfig.from_dict(pg.to_dict()) == pg
    assert isinstance(pg.generator_config(), projgan.ProjGANConfig)
    for overrides, message in (
        ({"augment": "flip"}, "unknown augmentation"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"resolution": 96}, "resolution"),
    ):
        with pytest.raises(ValueError, match=message):
            _cfg(**overrides)


@pytest.mark.parametrize("resolution", [64, 128])
def test_trains_and_returns_the_ema_generator(resolution: int) -> None:
    images, labels = _data(resolution=resolution)
    result = train_gan(images, labels, _cfg(resolution=resolution))
    assert result.architecture == "projgan" and result.steps == 3
    assert math.isfinite(result.final_loss_d) and math.isfinite(result.final_loss_g)
    assert (
        result.generator_config
        == projgan.ProjGANConfig(
            resolution=resolution, num_classes=2, g_channels=4, d_channels=4
        ).to_dict()
    )
    no_ema = train_gan(images, labels, _cfg(resolution=resolution, ema_decay=0.0))
    # Same training, but the returned weights are the average, not the last iterate.
    assert no_ema.final_loss_d == result.final_loss_d
    assert not torch.equal(
        result.generator_state["seed.weight"], no_ema.generator_state["seed.weight"]
    )


def test_same_seed_same_weights_and_other_seed_differs() -> None:
    images, labels = _data()
    a = train_gan(images, labels, _cfg(max_steps=2))
    b = train_gan(images, labels, _cfg(max_steps=2))
    c = train_gan(images, labels, _cfg(max_steps=2, seed=1))
    _assert_states_equal(a.generator_state, b.generator_state)
    assert not torch.equal(a.generator_state["seed.weight"], c.generator_state["seed.weight"])
    d = train_gan(images, labels, _cfg(max_steps=2, augment="none"))  # augmentation is used
    assert not torch.equal(a.generator_state["seed.weight"], d.generator_state["seed.weight"])


def test_cancelled_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    images, labels = _data()
    cfg = _cfg(max_steps=4)
    reference = train_gan(images, labels, cfg)

    ckpt = tmp_path / "run.safetensors"
    calls = 0

    def stop_after_two_steps() -> bool:
        nonlocal calls
        calls += 1
        return calls > 2

    first = train_gan(images, labels, cfg, checkpoint_path=ckpt, should_stop=stop_after_two_steps)
    assert first.stopped == "cancelled" and first.steps == 2
    tensors, meta = load_state(ckpt)
    assert meta["step"] == 2 and meta["architecture"] == "projgan"
    assert any(k.startswith("G_ema.") for k in tensors)  # the EMA generator is saved
    assert "rng.torch" in tensors  # noise, labels and augmentation draws

    second = train_gan(images, labels, cfg, checkpoint_path=ckpt)
    assert second.stopped == "budget" and second.steps == 4
    _assert_states_equal(reference.generator_state, second.generator_state)
    assert second.final_loss_d == reference.final_loss_d
    assert second.final_loss_g == reference.final_loss_g


def test_old_checkpoint_without_the_new_fields_still_resumes(tmp_path: Path) -> None:
    """A dcgan checkpoint written before augment/ema_decay existed is resumed, not discarded."""
    images, labels = _data()
    cfg = TrainConfig(
        class_names=["normal", "pneumonia"],
        batch_size=8,
        g_channels=8,
        d_channels=8,
        max_steps=2,
        device="cpu",
    )
    ckpt = tmp_path / "run.safetensors"
    train_gan(images, labels, cfg, checkpoint_path=ckpt)
    tensors, meta = load_state(ckpt)
    for key in ("augment", "ema_decay"):
        del meta["train_config"][key]
    save_state(ckpt, tensors, meta)
    resumed = train_gan(images, labels, cfg, checkpoint_path=ckpt)
    assert resumed.steps == 2  # nothing left to train: it was resumed


def test_generator_file_round_trip_and_sampling(tmp_path: Path) -> None:
    images, labels = _data()
    result = train_gan(images, labels, _cfg(max_steps=2))
    path = tmp_path / "g.safetensors"
    # The architecture is recognised from the config when not passed.
    digest = save_generator(path, result.generator_state, result.generator_config)
    _, meta = load_state(path)
    assert meta["architecture"] == "projgan" and meta["config"] == result.generator_config

    g = load_generator(path, digest)
    assert isinstance(g, projgan.Generator) and not g.training
    _assert_states_equal(result.generator_state, g.state_dict())
    with pytest.raises(ChecksumMismatch):
        load_generator(path, "0" * 64)

    a, ya = sample_images(g, {1: 3, 0: 2}, seed=5, batch_size=2, device="cpu")
    b, _ = sample_images(g, {1: 3, 0: 2}, seed=5, device="cpu")
    assert a.shape == (5, 64, 64) and a.dtype == np.uint8
    assert ya.tolist() == [0, 0, 1, 1, 1]
    assert np.array_equal(a, b) and a.std() > 0
    assert g.training is False

    with pytest.raises(ValueError, match="shape"):
        save_generator(
            tmp_path / "bad.safetensors",
            result.generator_state,
            {**result.generator_config, "g_channels": 8},
        )
    with pytest.raises(ValueError, match="unexpected"):
        save_generator(
            tmp_path / "bad.safetensors",
            result.generator_state,
            result.generator_config,
            architecture="dcgan",
        )


def test_dcgan_files_still_load_as_dcgan(tmp_path: Path) -> None:
    images, labels = _data()
    result = train_gan(images, labels, _cfg(architecture="dcgan", g_channels=8, d_channels=8))
    assert result.architecture == "dcgan"
    path = tmp_path / "g.safetensors"
    digest = save_generator(path, result.generator_state, result.generator_config)
    assert load_state(path)[1]["architecture"] == "dcgan"
    assert isinstance(load_generator(path, digest), DCGANGenerator)


def test_class_power_tempers_how_often_each_class_is_drawn() -> None:
    from synthray.models.gan.trainer import _Trainer

    images, labels = _data(n=104)  # 100 images of class 0, 4 of class 1
    cfg = _cfg(batch_size=64, class_power=0.5)
    trainer = _Trainer(images, labels, cfg, torch.device("cpu"), "fp32")
    expected = 2 / (10 + 2)  # sqrt(4) / (sqrt(100) + sqrt(4))
    assert trainer.class_probs[1] == pytest.approx(expected)
    real = torch.cat([trainer._real_batch()[1] for _ in range(20)]).float().mean().item()
    fake = torch.cat([trainer._noise()[1] for _ in range(20)]).float().mean().item()
    assert abs(real - expected) < 0.04 and abs(fake - expected) < 0.04
    flat = _cfg(batch_size=64, class_power=0.0)
    balanced = _Trainer(images, labels, flat, torch.device("cpu"), "fp32")
    ys = torch.cat([balanced._real_batch()[1] for _ in range(20)]).float().mean().item()
    assert 0.4 < ys < 0.6
