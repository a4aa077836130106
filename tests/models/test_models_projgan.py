"""Shapes, spectral normalisation, config handling and seeded initialisation of projgan."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from synthray.models.gan.projgan import (
    Discriminator,
    Generator,
    ProjGANConfig,
    build_seeded,
)
from synthray.models.runtime import to_channels_last


def _cfg(resolution: int = 64) -> ProjGANConfig:
    return ProjGANConfig(resolution=resolution, num_classes=3, g_channels=4, d_channels=4)


@pytest.mark.parametrize("resolution", [64, 128, 256])
def test_shapes_and_output_range(resolution: int) -> None:
    cfg = _cfg(resolution)
    g = build_seeded(Generator, cfg, torch.Generator().manual_seed(0))
    d = build_seeded(Discriminator, cfg, torch.Generator().manual_seed(1))
    z = torch.randn(4, cfg.z_dim)
    y = torch.tensor([0, 1, 2, 1])
    x = g(z, y)
    assert x.shape == (4, 1, resolution, resolution)
    assert x.min() >= -1.0 and x.max() <= 1.0
    logits = d(x, y)
    assert logits.shape == (4,)
    assert torch.isfinite(logits).all()


def test_widths_double_per_halving_and_are_capped() -> None:
    assert ProjGANConfig(resolution=64, g_channels=8).widths(8) == [64, 32, 16, 8]
    assert ProjGANConfig(resolution=256).widths(8) == [64, 64, 64, 32, 16, 8]


def test_every_discriminator_weight_is_spectrally_normalised() -> None:
    d = build_seeded(Discriminator, _cfg(), torch.Generator().manual_seed(0))
    weighted = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    weighted.append(d.embed)
    assert len(weighted) == 6  # 4 convolutions at 64x64, the linear head, the class embedding
    for m in weighted:
        assert parametrize.is_parametrized(m, "weight"), m
        # The effective weight's largest singular value is about 1 after the seeded init.
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1.0) < 0.05, (m, sigma)
    g = Generator(_cfg())
    assert not any(parametrize.is_parametrized(m) for m in g.modules())


def test_class_changes_generator_and_discriminator_output() -> None:
    cfg = _cfg()
    g = build_seeded(Generator, cfg, torch.Generator().manual_seed(0)).eval()
    d = build_seeded(Discriminator, cfg, torch.Generator().manual_seed(1)).eval()
    with torch.no_grad():  # CBN starts as a plain batch norm: perturb the class tables
        for m in g.modules():
            if isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    z = torch.randn(2, cfg.z_dim)
    with torch.no_grad():
        a = g(z, torch.tensor([0, 0]))
        b = g(z, torch.tensor([1, 1]))
        assert not torch.allclose(a, b)
        assert not torch.allclose(d(a, torch.tensor([0, 0])), d(a, torch.tensor([2, 2])))


def test_channels_last_bf16_matches_fp32_roughly() -> None:
    cfg = _cfg()
    g = build_seeded(Generator, cfg, torch.Generator().manual_seed(0)).eval()
    d = build_seeded(Discriminator, cfg, torch.Generator().manual_seed(1)).eval()
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


def test_config_validation_and_round_trip() -> None:
    cfg = ProjGANConfig(resolution=128, num_classes=5, z_dim=64)
    assert ProjGANConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ProjGANConfig.from_dict({**cfg.to_dict(), "embed_dim": 1})
    with pytest.raises(ValueError, match="resolution must be one of"):
        ProjGANConfig(resolution=96)
    with pytest.raises(ValueError, match="positive integer"):
        ProjGANConfig(g_channels=0)


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone() -> None:
    cfg = _cfg()
    before = torch.random.get_rng_state()
    for cls in (Generator, Discriminator):
        a = build_seeded(cls, cfg, torch.Generator().manual_seed(7))
        b = build_seeded(cls, cfg, torch.Generator().manual_seed(7))
        c = build_seeded(cls, cfg, torch.Generator().manual_seed(8))
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name
            assert torch.isfinite(sa[name].float()).all(), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert torch.equal(before, torch.random.get_rng_state())
