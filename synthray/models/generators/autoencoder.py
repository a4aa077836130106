"""The site autoencoder of the latent flow generator: radiographs <-> a small latent grid.

Latent generative models (Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models", CVPR 2022) first learn an autoencoder whose latent keeps what the eye
needs and drops pixel-level detail, then model the distribution of latents. The latent here
is ``latent_channels`` x S x S with S = ``latent_size`` (the registry's defaults: 16, and 32
at 128 and 256 px, where a 16 x 16 latent lost what separates the pneumonias), so the generative
model's cost grows with S, not with the resolution; the autoencoder's grows with both.

Shape: the encoder halves the side ``log2(R / S)`` times with stride-2 3x3 convolutions, the
decoder doubles it back with nearest-neighbour upsampling and a 3x3 convolution (no
checkerboard; Odena et al., Distill 2016). Widths start at ``width`` at full resolution and
double per halving, capped at 8x. Each level has one pre-activation residual block (He et al.
2016); group normalisation (Wu and He 2018) is used only at sides of 16 px and below: on CPU
its backward pass cost as much as a convolution at 64 x 64 (measured with torch 2.13), and
the upper levels train well without it.

Training (:mod:`synthray.models.generators.flow_trainer`): L1 reconstruction with Gaussian
noise added to the latent, so the decoder also maps latents near the data's to plausible
images (the flow's samples are such latents), and a small L2 penalty that keeps the latent's
scale bounded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

NORM_MAX_SIDE = 16
_MAX_WIDTH_FACTOR = 8


@dataclass
class AutoencoderConfig:
    resolution: int = 64
    latent_size: int = 16
    latent_channels: int = 4
    width: int = 16

    def __post_init__(self) -> None:
        for name in ("resolution", "latent_size", "latent_channels", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        ratio = self.resolution // self.latent_size
        if self.resolution % self.latent_size or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(
                f"resolution {self.resolution} must be the latent size {self.latent_size} "
                "times a power of two >= 2"
            )

    @property
    def levels(self) -> int:
        """Number of 2x down-samplings between the image and the latent."""
        return int(math.log2(self.resolution // self.latent_size))

    def widths(self) -> list[int]:
        """Channels at sides R, R/2, ..., S."""
        return [self.width * min(2**i, _MAX_WIDTH_FACTOR) for i in range(self.levels + 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown AutoencoderConfig keys: {sorted(unknown)}")
        return cls(**d)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), the second convolution zero-initialised, so
    a new block is the identity. With ``emb_dim`` the second norm's output is modulated by
    a scale and shift computed from an embedding (the flow's time and class)."""

    def __init__(self, c_in: int, c_out: int, *, norm: bool, emb_dim: int = 0) -> None:
        super().__init__()
        self.norm1: nn.Module = group_norm(c_in) if norm else nn.Identity()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2: nn.Module = group_norm(c_out) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip: nn.Module = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.emb: nn.Linear | None = nn.Linear(emb_dim, 2 * c_out) if emb_dim else None
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.norm2(h)
        if self.emb is not None and emb is not None:
            scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1)
            h = h * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class Encoder(nn.Module):
    """(B, 1, R, R) in [-1, 1] -> (B, latent_channels, S, S)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        w = cfg.widths()
        side = cfg.resolution
        layers: list[nn.Module] = [nn.Conv2d(1, w[0], 3, padding=1)]
        for i in range(cfg.levels):
            layers += [
                ResBlock(w[i], w[i], norm=side <= NORM_MAX_SIDE),
                nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1),  # side -> side / 2
            ]
            side //= 2
        layers += [
            ResBlock(w[-1], w[-1], norm=True),
            nn.SiLU(),
            nn.Conv2d(w[-1], cfg.latent_channels, 1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, latent_channels, S, S) -> (B, 1, R, R), unbounded (trained towards [-1, 1])."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        w = cfg.widths()
        side = cfg.latent_size
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.latent_channels, w[-1], 3, padding=1),
            ResBlock(w[-1], w[-1], norm=True),
            ResBlock(w[-1], w[-1], norm=True),
        ]
        for i in reversed(range(cfg.levels)):
            side *= 2
            layers += [
                nn.Upsample(scale_factor=2.0, mode="nearest"),  # side / 2 -> side
                nn.Conv2d(w[i + 1], w[i], 3, padding=1),
                ResBlock(w[i], w[i], norm=side <= NORM_MAX_SIDE),
            ]
        layers += [nn.SiLU(), nn.Conv2d(w[0], 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))
