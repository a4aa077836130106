"""Shapes, ranges, config handling and initialisation of the DCGAN networks."""

from __future__ import annotations

import pytest
import torch

from synthray.models.gan.dcgan import (
    DCGANConfig,
    Discriminator,
    Generator,
    build_seeded,
    to_channels_last,
)


@pytest.mark.parametrize("resolution", [64, 128])
def test_shapes_and_output_range(resolution: int) -> None:
    cfg = DCGANConfig(resolution=resolution, num_classes=3, g_channels=8, d_channels=8)
    g, d = Generator(cfg), Discriminator(cfg)
    z = torch.randn(4, cfg.z_dim)
    y = torch.tensor([0, 1, 2, 1])
    x = g(z, y)
    assert x.shape == (4, 1, resolution, resolution)
    assert x.min() >= -1.0 and x.max() <= 1.0
    logits = d(x, y)
    assert logits.shape == (4,)
    assert torch.isfinite(logits).all()


def test_label_changes_output() -> None:
    cfg = DCGANConfig(g_channels=8, d_channels=8)
    g = Generator(cfg).eval()
    z = torch.randn(2, cfg.z_dim)
    a = g(z, torch.tensor([0, 0]))
    b = g(z, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)


def test_channels_last_bf16_matches_fp32_roughly() -> None:
    cfg = DCGANConfig(g_channels=8, d_channels=8)
    g = Generator(cfg).eval()
    d = Discriminator(cfg).eval()
    z, y = torch.randn(2, cfg.z_dim), torch.tensor([0, 1])
    with torch.no_grad():
        ref = g(z, y)
        ref_logits = d(ref, y)
        to_channels_last(g)
        to_channels_last(d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = g(z, y)
            logits = d(out, y)
    assert out.shape == ref.shape and logits.shape == ref_logits.shape
    assert (out.float() - ref).abs().max() < 0.1


@pytest.mark.parametrize("resolution", [32, 96, 256])
def test_rejects_unsupported_resolution(resolution: int) -> None:
    with pytest.raises(ValueError, match="resolution must be one of"):
        DCGANConfig(resolution=resolution)


def test_config_round_trip() -> None:
    cfg = DCGANConfig(resolution=128, num_classes=5, z_dim=64, embed_dim=10)
    assert DCGANConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        DCGANConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_dcgan_init_and_seeded_build_is_reproducible() -> None:
    cfg = DCGANConfig(g_channels=16, d_channels=16)
    before = torch.random.get_rng_state()
    a = build_seeded(Generator, cfg, torch.Generator().manual_seed(7))
    b = build_seeded(Generator, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(before, torch.random.get_rng_state())  # global RNG untouched
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    convs = [m for m in a.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    conv_w = torch.cat([m.weight.flatten() for m in convs])
    assert abs(conv_w.mean().item()) < 2e-3
    assert abs(conv_w.std().item() - 0.02) < 2e-3
    bn = [m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bn:
        assert m.running_var is not None
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bn)
