"""The latent flow generator: its autoencoder and velocity field, the sampler inside the
generator, and the two phases of its training run."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from synthray.models.checkpoint import load_state
from synthray.models.generators.autoencoder import Autoencoder, AutoencoderConfig
from synthray.models.generators.config import TrainConfig
from synthray.models.generators.flow_trainer import AUTOENCODER, FLOW, FLOW_WARMUP, FlowTrainer
from synthray.models.generators.latentflow import (
    Generator,
    LatentFlowConfig,
    VelocityNet,
    build_seeded,
    tapered_guidance,
)
from synthray.models.generators.preview import generator_from_checkpoint
from synthray.models.generators.registry import ARCHITECTURES
from synthray.models.generators.sampling import LARGE_BATCH, default_batch_size, sample_images
from synthray.models.generators.training import train_generator
from synthray.models.runtime import cpu_bf16_fast

TINY = {"latent_size": 8, "latent_channels": 2, "ae_width": 4, "flow_width": 8}


def _cfg(**overrides: object) -> TrainConfig:
    base: dict[str, object] = {
        "architecture": "latentflow",
        "class_names": ["a", "b", "c"],
        **TINY,
        "batch_size": 8,
        "ae_batch_size": 8,
        "max_steps": 8,
        "device": "cpu",
        "checkpoint_every_s": 0.0,
        "sample_steps": 2,
    }
    return TrainConfig(**(base | overrides))  # type: ignore[arg-type]


def _data(n: int = 30, resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, resolution, resolution), dtype=np.uint8)
    return images, np.arange(n) % 3


def _perturb_zero_layers(net: torch.nn.Module) -> None:
    """Draw the weights that start at zero (each residual block's last convolution and the
    output layer), so that the network's output depends on all of its inputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        zero = [p for p in net.parameters() if p.dim() == 4 and float(p.abs().sum()) == 0.0]
        assert zero
        for p in zero:
            p.normal_(0.0, 0.1, generator=gen)


@pytest.mark.parametrize("resolution", [64, 128, 256])
def test_autoencoder_maps_every_resolution_to_the_same_latent_grid(resolution: int) -> None:
    cfg = AutoencoderConfig(resolution=resolution, latent_size=16, latent_channels=4, width=4)
    ae = Autoencoder(cfg)
    x = torch.rand(2, 1, resolution, resolution) * 2 - 1
    with torch.no_grad():
        z = ae.encoder(x)
        assert z.shape == (2, 4, 16, 16)
        assert ae.decoder(z).shape == (2, 1, resolution, resolution)
    assert cfg.levels == {64: 2, 128: 3, 256: 4}[resolution]
    assert cfg.widths()[0] == 4 and cfg.widths()[-1] == 4 * min(2**cfg.levels, 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resolution": 96}, "resolution must be one of"),
        ({"latent_size": 48}, "power of two"),
        ({"latent_size": 7}, "even"),
        ({"guidance": -1.0}, "guidance"),
        ({"sample_steps": 0}, "sample_steps"),
        ({"guidance_interval": [0.9, 0.2]}, "guidance_interval"),
        ({"guidance_interval": [0.2, 1.5]}, "guidance_interval"),
        ({"guidance_interval": [0.5]}, "guidance_interval"),
    ],
)
def test_config_refuses_what_the_networks_cannot_build(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LatentFlowConfig(**overrides)  # type: ignore[arg-type]


def test_velocity_field_starts_at_zero_and_depends_on_time_and_class() -> None:
    cfg = LatentFlowConfig(num_classes=3, **TINY)
    net = build_seeded(lambda: VelocityNet(cfg), torch.Generator().manual_seed(0))
    z = torch.randn(4, 2, 8, 8)
    t = torch.full((4,), 0.5)
    y = torch.tensor([0, 1, 2, 3])  # 3 is "no class"
    with torch.no_grad():
        assert torch.equal(net(z, t, y), torch.zeros_like(z))  # zero-initialised output layer
        _perturb_zero_layers(net)
        out = net(z, t, y)
        assert out.shape == z.shape
        assert not torch.allclose(out[0], net(z, torch.full((4,), 0.9), y)[0])
        other = net(z, t, torch.tensor([1, 1, 2, 3]))
        assert not torch.allclose(out[0], other[0]) and torch.allclose(out[1:], other[1:])


def test_seeded_build_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    cfg = LatentFlowConfig(num_classes=3, **TINY)
    before = torch.random.get_rng_state()
    a = build_seeded(lambda: Generator(cfg), torch.Generator().manual_seed(7)).state_dict()
    b = build_seeded(lambda: Generator(cfg), torch.Generator().manual_seed(7)).state_dict()
    c = build_seeded(lambda: Generator(cfg), torch.Generator().manual_seed(8)).state_dict()
    assert torch.equal(before, torch.random.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(a["latent_std"], torch.ones(1, 2, 1, 1))


def test_generator_is_a_deterministic_function_of_noise_and_class() -> None:
    cfg = LatentFlowConfig(num_classes=3, sample_steps=3, **TINY)
    g = build_seeded(lambda: Generator(cfg), torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():  # give the untrained field something to integrate
        _perturb_zero_layers(g.velocity)
    z = torch.randn(4, cfg.z_dim)
    y = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        x = g(z, y)
        assert x.shape == (4, 1, 64, 64) and x.min() >= -1 and x.max() <= 1
        assert torch.equal(x, g(z, y))
        assert not torch.equal(x[0], g(z, torch.tensor([1, 1, 2, 0]))[0])
        unguided = Generator(LatentFlowConfig(num_classes=3, sample_steps=3, guidance=1.0, **TINY))
        unguided.load_state_dict(g.state_dict())
        assert not torch.equal(x, unguided.eval()(z, y))


def test_cpu_batches_are_sized_by_the_latent_grid_and_do_not_change_the_images() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    at = {s: LatentFlowConfig(resolution=128, num_classes=2, latent_size=s) for s in (8, 16, 32)}
    assert [default_batch_size(at[s], cpu) for s in (8, 16, 32)] == [256, 128, 32]
    assert default_batch_size(at[32], cuda) == LARGE_BATCH
    gan = ARCHITECTURES["dcgan"].config(resolution=128, num_classes=2)
    assert default_batch_size(gan, cpu) == LARGE_BATCH

    cfg = LatentFlowConfig(num_classes=3, sample_steps=2, **TINY | {"latent_size": 32})
    g = build_seeded(lambda: Generator(cfg), torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        _perturb_zero_layers(g.velocity)
    own, _ = sample_images(g, {0: 20, 2: 20}, seed=4, device="cpu")  # batches of 32
    large, _ = sample_images(g, {0: 20, 2: 20}, seed=4, device="cpu", batch_size=LARGE_BATCH)
    assert own.std() > 0
    assert np.abs(own.astype(int) - large).max() <= 1 and (own != large).mean() < 0.01


def test_training_runs_the_autoencoder_then_the_flow(tmp_path: Path) -> None:
    images, labels = _data()
    cfg = _cfg(max_steps=8, ae_fraction=0.25)
    trainer = FlowTrainer(images, labels, cfg, torch.device("cpu"), "fp32")
    trainer.set_train_mode()
    phases = []
    for _ in range(8):
        trainer.train_step(0.0)
        phases.append(trainer.phase())
    assert phases == [AUTOENCODER] * 2 + [FLOW] * 6
    assert (trainer.ae_steps, trainer.flow_steps) == (2, 6)
    assert trainer.latents is not None and trainer.latents.shape == (30, 2, 8, 8)
    # Standardised per channel; the statistics travel with the generator.
    assert torch.allclose(trainer.latents.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-4)
    assert torch.allclose(trainer.latents.std(dim=(0, 2, 3)), torch.ones(2), atol=1e-3)
    _, state = trainer.result_state()
    assert torch.equal(state["latent_std"], trainer.latent_std)
    assert set(trainer.losses()) == {"flow"}


def test_autoencoder_trains_on_aligned_crops_then_on_whole_images() -> None:
    """With ae_crop, the first three quarters of the autoencoder's steps see random crops of
    that side, each a piece of a training image at an offset on the latent grid (stride 8
    here), and the last quarter whole images."""
    images, labels = _data()
    cfg = _cfg(max_steps=16, ae_fraction=0.5, ae_crop=32)
    trainer = FlowTrainer(images, labels, cfg, torch.device("cpu"), "fp32")
    seen: list[np.ndarray] = []
    trainer.ae.encoder.register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].detach().numpy().copy())
    )
    trainer.set_train_mode()
    for _ in range(8):
        trainer.train_step(0.0)
    assert [x.shape[-1] for x in seen] == [32] * 6 + [64] * 2
    assert np.isfinite(trainer.loss)
    as_uint8 = [np.rint((x[:, 0] + 1.0) * 127.5).astype(np.uint8) for x in seen[:6]]
    for crop in np.concatenate(as_uint8):
        hits = [
            (i, y, x)
            for i in range(len(images))
            for y in range(0, 33, 8)
            for x in range(0, 33, 8)
            if np.array_equal(images[i, y : y + 32, x : x + 32], crop)
        ]
        assert len(hits) == 1
    with pytest.raises(ValueError, match="multiple of 8"):
        _cfg(ae_crop=12)


def test_flow_learning_rate_cools_down_to_zero_at_the_end() -> None:
    """flow_cooldown 0.5: constant for the first half of the flow's phase, then linear to 0,
    by steps and by seconds (the autoencoder's share excluded)."""
    images, labels = _data()
    cfg = _cfg(max_steps=12, ae_fraction=0.25, flow_cooldown=0.5, lr_flow=1e-3)
    trainer = FlowTrainer(images, labels, cfg, torch.device("cpu"), "fp32")
    trainer.set_train_mode()
    lrs = []
    for _ in range(12):
        trainer.train_step(0.0)
        if trainer.phase() == FLOW:
            lrs.append(trainer.opt_flow.param_groups[0]["lr"])
    assert len(lrs) == 9  # 3 autoencoder steps of 12
    warm = [min(1.0, (i + 1) / FLOW_WARMUP) * 1e-3 for i in range(9)]
    cool = [min(1.0, (1 - i / 9) / 0.5) for i in range(9)]
    assert lrs == pytest.approx([w * c for w, c in zip(warm, cool, strict=True)])
    timed = FlowTrainer(
        images,
        labels,
        _cfg(max_steps=None, max_seconds=10.0, ae_fraction=0.2, flow_cooldown=0.25),
        torch.device("cpu"),
        "fp32",
    )
    timed.ae_seconds = 2.0
    assert timed._flow_progress(6.0) == pytest.approx(0.5)
    assert timed._flow_lr(9.0) == pytest.approx(0.5 * timed._flow_lr(2.0) * 1.0)
    assert timed._flow_lr(10.0) == 0.0
    with pytest.raises(ValueError, match="flow_cooldown"):
        _cfg(flow_cooldown=1.5)
    assert _cfg().flow_cooldown == 0.2  # the default: the last fifth of the flow phase


def test_time_budget_is_split_between_the_phases() -> None:
    images, labels = _data()
    seen: list[tuple[str, float]] = []
    cfg = _cfg(max_steps=None, max_seconds=4.0, ae_fraction=0.5, progress_every_s=0.0)
    result = train_generator(
        images, labels, cfg, on_progress=lambda p: seen.append((p.phase, p.seconds))
    )
    phases = [phase for phase, _ in seen]
    switch = phases.index(FLOW)
    assert set(phases[:switch]) == {AUTOENCODER} and set(phases[switch:]) == {FLOW}
    assert seen[switch][1] >= 2.0  # the flow starts once the autoencoder had its 2 s
    assert result.stopped == "budget" and result.seconds >= 4.0


def test_previews_wait_for_the_flow_phase(tmp_path: Path) -> None:
    images, labels = _data()
    ckpt = tmp_path / "run.safetensors"
    calls = 0

    def stop_after_two() -> bool:
        nonlocal calls
        calls += 1
        return calls > 2

    cfg = _cfg(max_steps=8, ae_fraction=0.5)  # 4 autoencoder steps, then 4 flow steps
    train_generator(images, labels, cfg, checkpoint_path=ckpt, should_stop=stop_after_two)
    assert load_state(ckpt)[1]["stage"] == AUTOENCODER
    assert generator_from_checkpoint(ckpt) is None
    train_generator(images, labels, cfg, checkpoint_path=ckpt)
    tensors, meta = load_state(ckpt)
    assert meta["stage"] == FLOW and "latents" in tensors
    g = generator_from_checkpoint(ckpt)
    assert isinstance(g, Generator)
    with torch.no_grad():
        assert g(torch.randn(2, g.cfg.z_dim), torch.tensor([0, 2])).shape == (2, 1, 64, 64)


def test_settings_of_other_families_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\['lr_d'\] do not apply to the latentflow"):
        _cfg(lr_d=1e-3)
    with pytest.raises(ValueError, match=r"\['guidance'\] do not apply to the projgan"):
        TrainConfig(architecture="projgan", class_names=["a"], max_steps=1, guidance=2.0)
    with pytest.raises(ValueError, match="ae_fraction"):
        _cfg(ae_fraction=1.0)
    cfg = TrainConfig(architecture="latentflow", class_names=["a", "b"], max_steps=1)
    assert (cfg.batch_size, cfg.guidance, cfg.lr_g) == (32, 2.0, None)
    assert cfg.generator_config().guidance == 2.0


def test_a_cpu_fp32_run_at_128_and_256_px_takes_the_smaller_flow_batch() -> None:
    def batch(resolution: int, **kw: object) -> int | None:
        cfg = TrainConfig(
            architecture="latentflow",
            class_names=["a"],
            max_steps=1,
            resolution=resolution,
            device="cpu",
            **kw,  # type: ignore[arg-type]
        )
        return cfg.batch_size

    assert [batch(r, precision="fp32") for r in (64, 128, 256)] == [32, 16, 16]
    assert [batch(r, precision="bf16") for r in (64, 128, 256)] == [32, 32, 32]
    assert batch(128, precision="fp32", batch_size=24) == 24  # a caller's value wins
    # "auto" is fp32 exactly where this CPU has no bf16 units (or bf16 is switched off).
    assert batch(128, precision="auto") == (32 if cpu_bf16_fast() else 16)
    # The value chosen is recorded, so a resumed run on this machine compares equal.
    cfg = TrainConfig(
        architecture="latentflow",
        class_names=["a"],
        max_steps=1,
        resolution=128,
        device="cpu",
        precision="fp32",
    )
    assert TrainConfig.from_dict(cfg.to_dict()).batch_size == 16
    assert ARCHITECTURES["projgan"].defaults_at(128, cpu_fp32=True)["batch_size"] == 64


def test_guidance_is_tapered_for_classes_with_few_patients() -> None:
    assert tapered_guidance(3.0, [100, 50, 25, 5, 0], full=50) == [3.0, 3.0, 2.0, 1.2, 1.0]
    assert tapered_guidance(1.0, [1, 100], full=50) == [1.0, 1.0]
    with pytest.raises(ValueError, match="one weight"):
        LatentFlowConfig(num_classes=3, class_guidance=[2.0, 2.0])
    # Each row is guided with its own class's weight: a class at weight 1 samples as the
    # unguided generator does, the others do not.
    cfg = LatentFlowConfig(num_classes=3, sample_steps=2, guidance=3.0, **TINY)
    g = build_seeded(lambda: Generator(cfg), torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        _perturb_zero_layers(g.velocity)
    tapered = Generator(
        LatentFlowConfig(num_classes=3, sample_steps=2, class_guidance=[1.0, 3.0, 3.0], **TINY)
    )
    unguided = Generator(LatentFlowConfig(num_classes=3, sample_steps=2, guidance=1.0, **TINY))
    for other in (tapered, unguided):
        other.load_state_dict(g.state_dict())
        other.eval()
    z, y = torch.randn(3, cfg.z_dim), torch.tensor([0, 1, 2])
    with torch.no_grad():
        a, b, c = g(z, y), tapered(z, y), unguided(z, y)
    assert torch.allclose(b[0], c[0]) and not torch.allclose(a[0], c[0])
    assert torch.allclose(b[1:], a[1:])


def test_guidance_applies_only_inside_its_interval() -> None:
    # Three Heun steps evaluate the field at t = 1, 2/3, 1/3 (and 2/3, 1/3 again).
    cfg = LatentFlowConfig(num_classes=3, sample_steps=3, guidance=3.0, **TINY)
    g = build_seeded(lambda: Generator(cfg), torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        _perturb_zero_layers(g.velocity)
    z, y = torch.randn(3, cfg.z_dim), torch.tensor([0, 1, 2])

    def sample(**overrides: object) -> torch.Tensor:
        other = Generator(LatentFlowConfig(**(asdict(cfg) | overrides)))  # type: ignore[arg-type]
        other.load_state_dict(g.state_dict())
        with torch.no_grad():
            return other.eval()(z, y)

    full, unguided = sample(), sample(guidance=1.0)
    assert torch.equal(sample(guidance_interval=[0.0, 1.0]), full)
    assert torch.equal(sample(guidance_interval=[0.1, 0.2]), unguided)  # no step inside
    middle = sample(guidance_interval=[0.5, 0.9])  # only t = 2/3 is guided
    assert not torch.allclose(middle, full) and not torch.allclose(middle, unguided)
    assert g.guides_at(0.5) and not Generator(
        LatentFlowConfig(guidance_interval=[0.5, 0.9], **TINY)
    ).guides_at(0.5)
