"""The training loops, for every registered architecture: budget, determinism, exact resume,
progress, generator files and sampling; then what is particular to each architecture."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from synthray.models.checkpoint import ChecksumMismatch, load_state, save_state
from synthray.models.generators import dcgan, projgan
from synthray.models.generators.config import TrainConfig, TrainProgress
from synthray.models.generators.files import load_generator, save_generator
from synthray.models.generators.gan_trainer import GanTrainer
from synthray.models.generators.registry import ARCHITECTURES
from synthray.models.generators.sampling import sample_images
from synthray.models.generators.training import train_generator
from synthray.models.runtime import cpu_bf16_fast

# Tiny networks: a few channels, so a step takes milliseconds.
TINY: dict[str, dict[str, Any]] = {
    "dcgan": {"g_channels": 8, "d_channels": 8, "batch_size": 8},
    "projgan": {"g_channels": 4, "d_channels": 4, "batch_size": 8},
    "latentflow": {
        "ae_width": 4,
        "flow_width": 8,
        "latent_size": 8,
        "latent_channels": 2,
        "ae_batch_size": 8,
        "batch_size": 8,
        "sample_steps": 2,
    },
}
WIDTH_FIELD = {"dcgan": "g_channels", "projgan": "g_channels", "latentflow": "flow_width"}
FIRST_WEIGHT = {
    "dcgan": "net.0.weight",
    "projgan": "seed.weight",
    "latentflow": "velocity.inp.weight",
}


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _data(n: int = 24, resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, resolution, resolution), dtype=np.uint8)
    labels = np.array([0] * (n - 4) + [1] * 4, dtype=np.int64)  # unbalanced on purpose
    return images, labels


def _cfg(arch: str = "projgan", **overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "architecture": arch,
        "class_names": ["normal", "pneumonia"],
        **TINY[arch],
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


# ------------------------------------------------------------------ every architecture


def test_trains_a_few_steps_with_finite_losses(arch: str) -> None:
    images, labels = _data()
    result = train_generator(images, labels, _cfg(arch))
    assert result.architecture == arch
    assert result.steps == 3 and result.images_seen == 24
    assert sum(result.phase_steps.values()) == 3
    assert set(result.phase_steps) == (
        {"autoencoder", "flow"} if arch == "latentflow" else {"train"}
    )
    assert result.stopped == "budget"
    assert result.final_losses and all(math.isfinite(v) for v in result.final_losses.values())
    # auto: bf16 only on CPUs with bf16 units; emulated bf16 is slower than fp32 elsewhere.
    assert result.device == "cpu"
    assert result.precision == ("bf16" if cpu_bf16_fast() else "fp32")
    assert all(t.device.type == "cpu" for t in result.generator_state.values())
    assert all(
        t.dtype == torch.float32 for t in result.generator_state.values() if t.is_floating_point()
    )
    a = ARCHITECTURES[arch]
    own = {k: v for k, v in TINY[arch].items() if k in a.config_fields}
    assert result.generator_config == a.config(num_classes=2, **own).to_dict()


def test_same_seed_same_weights_and_other_seed_differs(arch: str) -> None:
    images, labels = _data()
    a = train_generator(images, labels, _cfg(arch, max_steps=2))
    b = train_generator(images, labels, _cfg(arch, max_steps=2))
    c = train_generator(images, labels, _cfg(arch, max_steps=2, seed=1))
    _assert_states_equal(a.generator_state, b.generator_state)
    w = FIRST_WEIGHT[arch]
    assert not torch.equal(a.generator_state[w], c.generator_state[w])


def test_cancelled_run_resumes_to_the_uninterrupted_result(
    arch: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images, labels = _data()
    cfg = _cfg(arch, max_steps=4)
    reference = train_generator(images, labels, cfg)

    ckpt = tmp_path / "run.safetensors"
    calls = 0

    def stop_after_two_steps() -> bool:
        nonlocal calls
        calls += 1
        return calls > 2

    first = train_generator(
        images, labels, cfg, checkpoint_path=ckpt, should_stop=stop_after_two_steps
    )
    assert first.stopped == "cancelled" and first.steps == 2
    tensors, meta = load_state(ckpt)
    assert meta["step"] == 2 and meta["kind"] == "train_checkpoint"
    assert meta["architecture"] == arch
    assert "rng.torch" in tensors  # noise, labels and augmentation draws

    with caplog.at_level(logging.INFO, logger="synthray.models.generators.trainloop"):
        second = train_generator(images, labels, cfg, checkpoint_path=ckpt)
    assert "at step 2" in caplog.text  # resumed, not trained afresh to the same state
    assert second.stopped == "budget"
    assert second.steps == 4 and second.images_seen == 32
    assert second.phase_steps == reference.phase_steps  # the counters came back too
    _assert_states_equal(reference.generator_state, second.generator_state)
    assert second.final_losses == reference.final_losses
    # The earlier run's training time carries over (as recorded in the checkpoint, which
    # leaves out the time its own write took: under disk load that write alone can
    # outlast the two remaining steps, so first.seconds is not a lower bound).
    assert 0 < meta["seconds"] <= first.seconds
    assert second.seconds >= meta["seconds"]

    # A finished checkpoint is not trained further.
    third = train_generator(images, labels, cfg, checkpoint_path=ckpt)
    assert third.steps == 4
    _assert_states_equal(reference.generator_state, third.generator_state)


def test_killed_run_resumes_from_its_last_periodic_checkpoint(arch: str, tmp_path: Path) -> None:
    images, labels = _data()
    cfg = _cfg(arch, max_steps=4, progress_every_s=0.0)
    reference = train_generator(images, labels, cfg)
    ckpt = tmp_path / "run.safetensors"

    def die_at_step_three(p: TrainProgress) -> None:
        if p.step == 3:
            raise RuntimeError("worker killed")

    with pytest.raises(RuntimeError, match="killed"):
        train_generator(images, labels, cfg, checkpoint_path=ckpt, on_progress=die_at_step_three)
    _, meta = load_state(ckpt)
    assert meta["step"] == 2  # the periodic checkpoint written after step 2
    resumed = train_generator(images, labels, cfg, checkpoint_path=ckpt)
    assert resumed.steps == 4
    _assert_states_equal(reference.generator_state, resumed.generator_state)


def test_resumed_time_counts_toward_max_seconds(arch: str, tmp_path: Path) -> None:
    images, labels = _data()
    ckpt = tmp_path / "run.safetensors"
    train_generator(images, labels, _cfg(arch, max_steps=2), checkpoint_path=ckpt)
    _, meta = load_state(ckpt)
    assert meta["seconds"] > 0
    cfg = _cfg(arch, max_steps=1000, max_seconds=meta["seconds"])  # budget fields may change
    result = train_generator(images, labels, cfg, checkpoint_path=ckpt)
    assert result.steps == 2 and result.stopped == "budget"
    assert result.seconds >= meta["seconds"]


def test_checkpoint_of_another_run_is_not_resumed(arch: str, tmp_path: Path) -> None:
    images, labels = _data()
    ckpt = tmp_path / "run.safetensors"
    train_generator(images, labels, _cfg(arch, max_steps=2, seed=5), checkpoint_path=ckpt)
    fresh = train_generator(images, labels, _cfg(arch, max_steps=2))
    resumed = train_generator(images, labels, _cfg(arch, max_steps=2), checkpoint_path=ckpt)
    _assert_states_equal(fresh.generator_state, resumed.generator_state)
    _, meta = load_state(ckpt)
    assert meta["train_config"]["seed"] == 0  # overwritten by the new run


def test_time_budget_stops_the_run(arch: str) -> None:
    images, labels = _data()
    result = train_generator(images, labels, _cfg(arch, max_steps=None, max_seconds=0.0))
    assert result.steps == 0 and result.stopped == "budget"
    result = train_generator(images, labels, _cfg(arch, max_steps=10_000, max_seconds=0.3))
    assert 1 <= result.steps < 10_000


def test_progress_is_reported_and_final_call_made(arch: str) -> None:
    images, labels = _data()
    seen: list[TrainProgress] = []
    cfg = _cfg(arch, max_steps=3, progress_every_s=0.0)
    train_generator(images, labels, cfg, on_progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 3]
    last = seen[-1]
    assert last.total_steps == 3 and last.images_seen == 24
    assert last.images_per_second > 0 and last.eta_seconds == 0.0
    seen.clear()
    cfg = _cfg(arch, max_steps=3, progress_every_s=3600.0)
    train_generator(images, labels, cfg, on_progress=seen.append)
    assert [p.step for p in seen] == [3]


def test_config_round_trip(arch: str) -> None:
    cfg = _cfg(arch, max_seconds=12.5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg.generator_config(), ARCHITECTURES[arch].config)


def test_generator_file_round_trip_and_sampling(arch: str, tmp_path: Path) -> None:
    images, labels = _data()
    result = train_generator(images, labels, _cfg(arch, max_steps=2))
    path = tmp_path / "g.safetensors"
    # The architecture is recognised from the config when not passed.
    digest = save_generator(
        path, result.generator_state, result.generator_config, {"class_names": ["n", "p"]}
    )
    _, meta = load_state(path)
    assert meta["kind"] == "generator" and meta["architecture"] == arch
    assert meta["config"] == result.generator_config and meta["class_names"] == ["n", "p"]

    g = load_generator(path, digest)
    assert isinstance(g, ARCHITECTURES[arch].generator) and not g.training
    _assert_states_equal(result.generator_state, g.state_dict())
    with pytest.raises(ChecksumMismatch):
        load_generator(path, "0" * 64)

    a, ya = sample_images(g, {1: 3, 0: 2}, seed=5, batch_size=2, device="cpu")
    b, _ = sample_images(g, {1: 3, 0: 2}, seed=5, device="cpu")
    assert a.shape == (5, 64, 64) and a.dtype == np.uint8
    assert ya.tolist() == [0, 0, 1, 1, 1]
    assert np.array_equal(a, b) and a.std() > 0
    assert g.training is False

    with pytest.raises(ValueError, match="must not override"):
        save_generator(path, result.generator_state, result.generator_config, {"kind": "x"})
    width = WIDTH_FIELD[arch]
    bad_config = {**result.generator_config, width: 2 * result.generator_config[width]}
    with pytest.raises(ValueError, match="shape"):
        save_generator(tmp_path / "bad.safetensors", result.generator_state, bad_config)
    other = next(a for a in ARCHITECTURES if a != arch)
    with pytest.raises(ValueError, match=r"unexpected|missing|unknown"):
        save_generator(
            tmp_path / "bad.safetensors",
            result.generator_state,
            result.generator_config,
            architecture=other,
        )


# ------------------------------------------------------------------- configuration


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_explicit_precision_runs(precision: str) -> None:
    images, labels = _data()
    result = train_generator(images, labels, _cfg("dcgan", precision=precision, max_steps=2))
    assert result.precision == precision and result.steps == 2
    assert math.isfinite(result.final_losses["d"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_steps": None, "max_seconds": None}, "budget"),
        ({"architecture": "stylegan2"}, "unknown architecture"),
        ({"resolution": 96}, "resolution"),
        ({"class_names": []}, "class_names"),
        ({"precision": "fp8"}, "precision"),
        ({"device": "tpu"}, "device"),
        ({"augment": "flip"}, "unknown augmentation"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ],
)
def test_config_validation(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _cfg(**overrides)


def test_architecture_defaults_are_resolved_and_recorded() -> None:
    dc = TrainConfig(class_names=["a"], max_steps=1)
    assert (dc.architecture, dc.g_channels, dc.d_channels, dc.augment, dc.ema_decay) == (
        "dcgan",
        64,
        64,
        "none",
        0.0,
    )
    assert dc.class_power == 0.0
    pg = TrainConfig(architecture="projgan", class_names=["a"], max_steps=1)
    assert (pg.g_channels, pg.d_channels, pg.augment, pg.ema_decay, pg.class_power) == (
        32,
        64,
        "color,translation,cutout",
        0.999,
        0.5,
    )
    assert TrainConfig.from_dict(pg.to_dict()) == pg
    assert isinstance(pg.generator_config(), projgan.ProjGANConfig)
    assert isinstance(dc.generator_config(), dcgan.DCGANConfig)


def test_latent_flow_defaults_depend_on_the_resolution() -> None:
    def flow(**kw: object) -> TrainConfig:
        return TrainConfig(architecture="latentflow", class_names=["a"], max_steps=1, **kw)

    assert [flow(resolution=r).latent_size for r in (64, 128, 256)] == [16, 32, 32]
    at128 = flow(resolution=128)
    assert at128.generator_config().autoencoder().levels == 2  # 128 -> 64 -> 32
    assert flow(resolution=256).generator_config().autoencoder().levels == 3  # 256 -> 32
    assert TrainConfig.from_dict(at128.to_dict()) == at128
    assert flow(resolution=128, latent_size=16).latent_size == 16  # an explicit value wins
    intervals = [flow(resolution=r).generator_config().guidance_interval for r in (64, 128, 256)]
    assert intervals == [None, [0.0, 0.5], [0.0, 0.5]]  # None: guided at every step
    assert flow(resolution=128, guidance_interval=(0.2, 0.9)).guidance_interval == [0.2, 0.9]
    assert flow(resolution=128).guidance_interval is not flow(resolution=128).guidance_interval


def test_data_validation() -> None:
    images, labels = _data()
    with pytest.raises(ValueError, match="resolution"):
        train_generator(images[:, :32, :32], labels, _cfg())
    with pytest.raises(ValueError, match="uint8"):
        train_generator(images.astype(np.float32), labels, _cfg())
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        train_generator(images, labels + 1, _cfg())
    with pytest.raises(ValueError, match="without any training image"):
        train_generator(images, np.zeros_like(labels), _cfg())


def test_old_checkpoint_without_the_new_fields_still_resumes(tmp_path: Path) -> None:
    """A dcgan checkpoint written before augment/ema_decay existed is resumed, not discarded."""
    images, labels = _data()
    cfg = _cfg("dcgan", max_steps=2)
    ckpt = tmp_path / "run.safetensors"
    train_generator(images, labels, cfg, checkpoint_path=ckpt)
    tensors, meta = load_state(ckpt)
    for key in ("augment", "ema_decay"):
        del meta["train_config"][key]
    save_state(ckpt, tensors, meta)
    resumed = train_generator(images, labels, cfg, checkpoint_path=ckpt)
    assert resumed.steps == 2  # nothing left to train: it was resumed


# ------------------------------------------------------- particular to one architecture


def test_dcgan_real_batches_are_class_balanced() -> None:
    images, labels = _data()  # 20 images of class 0, 4 of class 1
    trainer = GanTrainer(images, labels, _cfg("dcgan", batch_size=64), torch.device("cpu"), "fp32")
    drawn = [trainer._real_batch() for _ in range(20)]
    ys = torch.cat([y for _, y in drawn])
    assert 0.4 < ys.float().mean().item() < 0.6
    xs = torch.cat([x for x, _ in drawn])  # (B, 1, R, R) scaled to [-1, 1]
    assert xs.min() >= -1.0 and xs.max() <= 1.0
    # Each drawn image really belongs to the drawn class.
    class_one = {images[i].tobytes() for i in np.flatnonzero(labels == 1)}
    for x, y in zip(xs[:64], ys[:64], strict=True):
        pixels = ((x[0] + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()
        assert (pixels in class_one) == bool(y == 1)


def test_projgan_class_power_tempers_how_often_each_class_is_drawn() -> None:
    images, labels = _data(n=104)  # 100 images of class 0, 4 of class 1
    cfg = _cfg(batch_size=64, class_power=0.5)
    trainer = GanTrainer(images, labels, cfg, torch.device("cpu"), "fp32")
    expected = 2 / (10 + 2)  # sqrt(4) / (sqrt(100) + sqrt(4))
    assert trainer.class_probs[1] == pytest.approx(expected)
    real = torch.cat([trainer._real_batch()[1] for _ in range(20)]).float().mean().item()
    fake = torch.cat([trainer._noise()[1] for _ in range(20)]).float().mean().item()
    assert abs(real - expected) < 0.04 and abs(fake - expected) < 0.04


@pytest.mark.parametrize("resolution", [64, 128])
def test_projgan_returns_the_ema_generator(resolution: int) -> None:
    images, labels = _data(resolution=resolution)
    result = train_generator(images, labels, _cfg(resolution=resolution))
    no_ema = train_generator(images, labels, _cfg(resolution=resolution, ema_decay=0.0))
    # Same training, but the returned weights are the average, not the last iterate.
    assert no_ema.final_losses == result.final_losses
    assert not torch.equal(
        result.generator_state["seed.weight"], no_ema.generator_state["seed.weight"]
    )


def test_projgan_checkpoint_keeps_the_ema_and_uses_augmentation(tmp_path: Path) -> None:
    images, labels = _data()
    ckpt = tmp_path / "run.safetensors"
    a = train_generator(images, labels, _cfg(max_steps=2), checkpoint_path=ckpt)
    tensors, _ = load_state(ckpt)
    assert any(k.startswith("G_ema.") for k in tensors)  # the EMA generator is saved
    d = train_generator(images, labels, _cfg(max_steps=2, augment="none"))  # augmentation is used
    assert not torch.equal(a.generator_state["seed.weight"], d.generator_state["seed.weight"])
