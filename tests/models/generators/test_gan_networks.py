"""The generator and discriminator of every registered GAN: shapes, ranges, class
conditioning, layouts, configs and seeded builds; then what is particular to each."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from synthray.models.generators import dcgan, projgan
from synthray.models.generators.registry import ARCHITECTURES, Architecture, architecture_of
from synthray.models.runtime import to_channels_last

GANS = sorted(name for name, a in ARCHITECTURES.items() if a.gan is not None)


@pytest.fixture(params=GANS)
def arch(request: pytest.FixtureRequest) -> Architecture:
    return ARCHITECTURES[request.param]


def _cfg(arch: Architecture, resolution: int = 64) -> dcgan.DCGANConfig | projgan.ProjGANConfig:
    return arch.config(resolution=resolution, num_classes=3, g_channels=4, d_channels=4)


def _build(arch: Architecture, resolution: int = 64) -> tuple[torch.nn.Module, torch.nn.Module]:
    return arch.build(_cfg(arch, resolution), torch.Generator().manual_seed(0))


def test_shapes_and_output_range_at_every_supported_resolution(arch: Architecture) -> None:
    for resolution in arch.resolutions:
        g, d = _build(arch, resolution)
        z = torch.randn(4, 100)
        y = torch.tensor([0, 1, 2, 1])
        with torch.no_grad():
            x = g(z, y)
            logits = d(x, y)
        assert x.shape == (4, 1, resolution, resolution)
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert logits.shape == (4,)
        assert torch.isfinite(logits).all()


def test_class_changes_generator_and_discriminator_output(arch: Architecture) -> None:
    g, d = _build(arch)
    g.eval()
    d.eval()
    with torch.no_grad():  # a conditional batch norm starts as a plain one: perturb the tables
        for m in g.modules():
            if isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    z = torch.randn(2, 100)
    with torch.no_grad():
        a = g(z, torch.tensor([0, 0]))
        b = g(z, torch.tensor([1, 1]))
        assert not torch.allclose(a, b)
        assert not torch.allclose(d(a, torch.tensor([0, 0])), d(a, torch.tensor([2, 2])))


def test_channels_last_bf16_matches_fp32_roughly(arch: Architecture) -> None:
    g, d = _build(arch)
    g.eval()
    d.eval()
    z, y = torch.randn(2, 100), torch.tensor([0, 1])
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


def test_config_validation_and_round_trip(arch: Architecture) -> None:
    cfg = arch.config(resolution=128, num_classes=5, z_dim=64)
    assert arch.config.from_dict(cfg.to_dict()) == cfg
    assert architecture_of(cfg.to_dict()) == arch.name  # the key sets tell them apart
    with pytest.raises(ValueError, match="unknown"):
        arch.config.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="resolution must be one of"):
        arch.config(resolution=96)
    with pytest.raises(ValueError, match="positive integer"):
        arch.config(g_channels=0)


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone(arch: Architecture) -> None:
    cfg = _cfg(arch)
    before = torch.random.get_rng_state()
    assert arch.gan is not None
    for cls in (arch.generator, arch.gan.discriminator):
        a = arch.gan.build_seeded(cls, cfg, torch.Generator().manual_seed(7))
        b = arch.gan.build_seeded(cls, cfg, torch.Generator().manual_seed(7))
        c = arch.gan.build_seeded(cls, cfg, torch.Generator().manual_seed(8))
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name
            assert torch.isfinite(sa[name].float()).all(), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("resolution", [32, 96, 512])
def test_rejects_unsupported_resolution(arch: Architecture, resolution: int) -> None:
    with pytest.raises(ValueError, match="resolution must be one of"):
        arch.config(resolution=resolution)


# ------------------------------------------------------- particular to one architecture


def test_dcgan_init_follows_radford_et_al() -> None:
    cfg = dcgan.DCGANConfig(g_channels=16, d_channels=16)
    a = dcgan.build_seeded(dcgan.Generator, cfg, torch.Generator().manual_seed(7))
    convs = [m for m in a.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    conv_w = torch.cat([m.weight.flatten() for m in convs])
    assert abs(conv_w.mean().item()) < 2e-3
    assert abs(conv_w.std().item() - 0.02) < 2e-3
    bn = [m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bn:
        assert m.running_var is not None
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bn)


def test_projgan_widths_double_per_halving_and_are_capped() -> None:
    assert projgan.ProjGANConfig(resolution=64, g_channels=8).widths(8) == [64, 32, 16, 8]
    assert projgan.ProjGANConfig(resolution=256).widths(8) == [64, 64, 64, 32, 16, 8]


def test_projgan_every_discriminator_weight_is_spectrally_normalised() -> None:
    arch = ARCHITECTURES["projgan"]
    _, d = _build(arch)
    weighted = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    weighted.append(d.embed)
    assert len(weighted) == 6  # 4 convolutions at 64x64, the linear head, the class embedding
    for m in weighted:
        assert parametrize.is_parametrized(m, "weight"), m
        # The effective weight's largest singular value is about 1 after the seeded init.
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1.0) < 0.05, (m, sigma)
    g = projgan.Generator(_cfg(arch))
    assert not any(parametrize.is_parametrized(m) for m in g.modules())
