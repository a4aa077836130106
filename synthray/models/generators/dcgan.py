"""Class-conditional DCGAN for single-channel radiographs.

Architecture after Radford, Metz and Chintala, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", ICLR 2016 (arXiv:1511.06434): strided
(transposed) convolutions instead of pooling, batch normalisation in both networks except the
generator output and the discriminator input, ReLU in the generator with a tanh output, LeakyReLU
(slope 0.2) in the discriminator, weights drawn from N(0, 0.02).

Class conditioning follows the conditional GAN of Mirza and Osindero, "Conditional Generative
Adversarial Nets", 2014 (arXiv:1411.1784): the generator sees a learned label embedding
concatenated to z; the discriminator sees the label as one extra input channel, a learned
per-class R x R map stacked onto the image.

The seed study for chest X-rays is Salehinejad et al., "Generalization of Deep Neural Networks for
Chest Pathology Classification in X-Rays Using Generative Adversarial Networks", ICASSP 2018,
which trained DCGANs to synthesise radiographs of under-represented pathologies.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

SUPPORTED_RESOLUTIONS = (64, 128)


@dataclass
class DCGANConfig:
    """Hyper-parameters that fully determine the DCGAN networks (stored in every checkpoint)."""

    resolution: int = 64
    num_classes: int = 2
    z_dim: int = 100
    g_channels: int = 64
    d_channels: int = 64
    embed_dim: int = 50

    def __post_init__(self) -> None:
        if self.resolution not in SUPPORTED_RESOLUTIONS:
            raise ValueError(
                f"DCGAN resolution must be one of {SUPPORTED_RESOLUTIONS}, got {self.resolution}"
            )
        for name in ("num_classes", "z_dim", "g_channels", "d_channels", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DCGANConfig.{name} must be a positive integer, got {value!r}")

    @property
    def num_upsamplings(self) -> int:
        """Number of 2x stages between the 4x4 seed and the output (4 at 64, 5 at 128)."""
        return int(math.log2(self.resolution)) - 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DCGANConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DCGANConfig keys: {sorted(unknown)}")
        return cls(**d)


def init_dcgan_weights(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Initialise every parameter of ``module`` as in the DCGAN paper (Section 4).

    Convolutions: N(0, 0.02); batch-norm scale: N(1, 0.02) and shift 0 (as in the reference
    implementation); label embeddings: N(0, 1). Every parameter is overwritten from
    ``generator``, and batch-norm running statistics are reset, so a seeded generator makes the
    result independent of the global RNG (also after ``to_empty``).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02, generator=generator)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 1.0, generator=generator)


class Generator(nn.Module):
    """DCGAN generator: (z, y) -> grey image in [-1, 1] of size cfg.resolution.

    The 4x4 seed has ``g_channels * 2**(n-1)`` channels (n = number of 2x stages) and every
    transposed convolution halves the channels and doubles the side, as in Figure 1 of the paper.
    """

    def __init__(self, cfg: DCGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.num_classes, cfg.embed_dim)
        n = cfg.num_upsamplings
        ch = cfg.g_channels * 2 ** (n - 1)
        layers: list[nn.Module] = [
            # (B, z_dim + embed_dim, 1, 1) -> (B, ch, 4, 4)
            nn.ConvTranspose2d(cfg.z_dim + cfg.embed_dim, ch, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
        ]
        for _ in range(n - 1):
            # (B, ch, s, s) -> (B, ch / 2, 2s, 2s)
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        # (B, g_channels, R/2, R/2) -> (B, 1, R, R)
        layers += [nn.ConvTranspose2d(ch, 1, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        """z: (B, z_dim) float, y: (B,) int64 class ids -> (B, 1, R, R) in [-1, 1]."""
        h = torch.cat([z, self.embed(y).to(z.dtype)], dim=1)  # (B, z_dim + embed_dim)
        return self.net(h[:, :, None, None])  # (B, 1, R, R)


class Discriminator(nn.Module):
    """DCGAN discriminator: (x, y) -> one real/fake logit per image.

    The label enters as a learned (R, R) map per class, stacked onto the image as a second input
    channel. Strided 4x4 convolutions halve the side down to 4x4, a last 4x4 convolution gives
    the logit. No batch norm on the input layer (paper, Section 3).
    """

    def __init__(self, cfg: DCGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        r = cfg.resolution
        self.label_map = nn.Embedding(cfg.num_classes, r * r)
        n = cfg.num_upsamplings
        ch = cfg.d_channels
        layers: list[nn.Module] = [
            # (B, 2, R, R) -> (B, d_channels, R/2, R/2)
            nn.Conv2d(2, ch, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for _ in range(n - 1):
            # (B, ch, s, s) -> (B, 2 ch, s/2, s/2)
            layers += [
                nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            ch *= 2
        # (B, ch, 4, 4) -> (B, 1, 1, 1)
        layers.append(nn.Conv2d(ch, 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x: (B, 1, R, R) in [-1, 1], y: (B,) int64 class ids -> logits (B,)."""
        b, _, r, _ = x.shape
        label = self.label_map(y).to(x.dtype).view(b, 1, r, r)  # (B, 1, R, R)
        h = torch.cat([x, label], dim=1)  # (B, 2, R, R)
        first = self.net[0]
        assert isinstance(first, nn.Conv2d)
        if first.weight.is_contiguous(memory_format=torch.channels_last):  # model in NHWC
            h = h.contiguous(memory_format=torch.channels_last)
        return self.net(h).view(b)  # (B,)


def build_seeded(
    cls: type[Generator] | type[Discriminator], cfg: DCGANConfig, generator: torch.Generator
) -> nn.Module:
    """Build ``cls(cfg)`` on CPU with every parameter drawn from ``generator``.

    The network is first built on the meta device, so the global RNG is neither used nor advanced.
    """
    with torch.device("meta"):
        net = cls(cfg)
    net = net.to_empty(device="cpu")
    init_dcgan_weights(net, generator)
    return net
