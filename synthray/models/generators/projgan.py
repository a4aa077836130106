"""Class-conditional GAN for small, unbalanced radiograph sets: SN + projection discriminator.

Discriminator: every weight is spectrally normalised (Miyato, Kataoka, Koyama and Yoshida,
"Spectral Normalization for Generative Adversarial Networks", ICLR 2018, arXiv:1802.05957), so
it is 1-Lipschitz per layer and cannot sharpen onto a handful of images as fast as an
unconstrained one. The class enters through the projection head of Miyato and Koyama, "cGANs
with Projection Discriminator", ICLR 2018 (arXiv:1802.05637): D(x, y) = psi(phi(x)) +
<embed(y), phi(x)>, where phi(x) is the globally sum-pooled feature vector.

Generator: upsample + 3x3 convolution blocks (nearest-neighbour upsampling avoids the
checkerboard of strided transposed convolutions, Odena, Dumoulin and Olah, "Deconvolution and
Checkerboard Artifacts", Distill 2016) with class-conditional batch normalisation (de Vries et
al., "Modulating early visual processing by language", NeurIPS 2017; used for cGANs by Miyato
and Koyama 2018): a per-class scale and shift after a batch norm without affine parameters.

The loss (hinge, Lim and Ye 2017), the differentiable augmentation (Zhao et al. 2020) and the
EMA of the generator are the training loop's (:mod:`synthray.models.generators.trainer`).

Widths: ``g_channels`` / ``d_channels`` are the widths at half the output side; they double
every time the side halves, up to 8x. At the defaults (32 and 64; at 64x64 the generator has
256-128-64-32-32 channels from 4x4 up, the discriminator 64-128-256-512 from 32x32 down) a
training step costs about what a DCGAN step at its defaults costs on 2 CPU cores (bf16,
channels_last): most of it is the discriminator, which runs three times per step. In our
equal-time runs on the NIH demo subset, 48/48 gave stronger grid artefacts, and 32/32 (more
steps) let the rarest class drift towards copies of its training images.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (conventional alias)
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

SUPPORTED_RESOLUTIONS = (64, 128, 256)
_MAX_WIDTH_FACTOR = 8


@dataclass
class ProjGANConfig:
    """Hyper-parameters that fully determine the networks (stored in every checkpoint)."""

    resolution: int = 64
    num_classes: int = 2
    z_dim: int = 100
    g_channels: int = 32
    d_channels: int = 64

    def __post_init__(self) -> None:
        if self.resolution not in SUPPORTED_RESOLUTIONS:
            raise ValueError(
                f"projgan resolution must be one of {SUPPORTED_RESOLUTIONS}, got {self.resolution}"
            )
        for name in ("num_classes", "z_dim", "g_channels", "d_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ProjGANConfig.{name} must be a positive integer, got {value!r}")

    @property
    def num_upsamplings(self) -> int:
        """Number of 2x stages between the 4x4 seed and the output (4 at 64, 5 at 128)."""
        return int(math.log2(self.resolution)) - 2

    def widths(self, base: int) -> list[int]:
        """Channels at sides 4, 8, ..., R/2: ``base`` at R/2, doubling per halving, capped."""
        n = self.num_upsamplings
        return [base * min(2 ** (n - 1 - i), _MAX_WIDTH_FACTOR) for i in range(n)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProjGANConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ProjGANConfig keys: {sorted(unknown)}")
        return cls(**d)


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm without affine parameters, then a per-class scale and shift.

    The scale is stored as an offset from 1 so that the initial layer is a plain batch norm.
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Embedding(num_classes, channels)  # scale - 1
        self.beta = nn.Embedding(num_classes, channels)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x: (B, C, H, W), y: (B,) -> (B, C, H, W)."""
        h = self.bn(x)
        gamma = self.gamma(y).to(h.dtype)[:, :, None, None]  # (B, C, 1, 1)
        beta = self.beta(y).to(h.dtype)[:, :, None, None]  # (B, C, 1, 1)
        return h * (1.0 + gamma) + beta


class GBlock(nn.Module):
    """CBN -> ReLU -> 2x nearest upsampling -> 3x3 conv: (B, C_in, s, s) -> (B, C_out, 2s, 2s)."""

    def __init__(self, c_in: int, c_out: int, num_classes: int) -> None:
        super().__init__()
        self.norm = ConditionalBatchNorm2d(c_in, num_classes)
        self.conv = nn.Conv2d(c_in, c_out, 3, 1, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = torch.relu(self.norm(x, y))  # (B, C_in, s, s)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # (B, C_in, 2s, 2s)
        return self.conv(h)  # (B, C_out, 2s, 2s)


class Generator(nn.Module):
    """(z, y) -> grey image in [-1, 1] of size cfg.resolution.

    z is mapped linearly to a 4x4 seed; each block doubles the side; a last CBN, ReLU, 3x3 conv
    and tanh give the image.
    """

    def __init__(self, cfg: ProjGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths(cfg.g_channels)  # channels at sides 4 .. R/2
        self.seed = nn.Linear(cfg.z_dim, widths[0] * 16)
        ins = widths
        outs = [*widths[1:], widths[-1]]  # the last block keeps the R/2 width at side R
        self.blocks = nn.ModuleList(
            GBlock(a, b, cfg.num_classes) for a, b in zip(ins, outs, strict=True)
        )
        self.out_norm = ConditionalBatchNorm2d(outs[-1], cfg.num_classes)
        self.out_conv = nn.Conv2d(outs[-1], 1, 3, 1, 1)
        init_projgan_weights(self)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        """z: (B, z_dim) float, y: (B,) int64 class ids -> (B, 1, R, R) in [-1, 1]."""
        b = z.shape[0]
        h = self.seed(z).view(b, -1, 4, 4)  # (B, C0, 4, 4)
        if self.out_conv.weight.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            h = block(h, y)  # (B, C, 2s, 2s)
        h = torch.relu(self.out_norm(h, y))  # (B, C, R, R)
        return torch.tanh(self.out_conv(h))  # (B, 1, R, R)


class Discriminator(nn.Module):
    """(x, y) -> one real/fake logit per image, with a projection class head.

    Spectrally normalised 4x4 stride-2 convolutions, each followed by LeakyReLU 0.1, take the
    image to ``d_channels`` at half its side and then halve the side and double the width down
    to 4x4: the down-sampling layers of the SN-GAN paper's "standard CNN" (Table 3) without its
    stride-1 layers, so that a step costs no more than a DCGAN step on CPU. phi(x) is the sum
    over the 4x4 positions; the logit is linear(phi) + <embed(y), phi> (Miyato and Koyama
    2018, eq. 3). The class embedding is spectrally normalised too, as in their code.
    """

    def __init__(self, cfg: ProjGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths(cfg.d_channels)[::-1]  # channels at sides R/2 .. 4
        layers: list[nn.Module] = [
            # (B, 1, R, R) -> (B, d_channels, R / 2, R / 2)
            spectral_norm(nn.Conv2d(1, widths[0], 4, 2, 1)),
            nn.LeakyReLU(0.1, inplace=True),
        ]
        for a, b in itertools.pairwise(widths):
            # (B, a, s, s) -> (B, b, s / 2, s / 2)
            layers += [spectral_norm(nn.Conv2d(a, b, 4, 2, 1)), nn.LeakyReLU(0.1, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.linear = spectral_norm(nn.Linear(widths[-1], 1))
        self.embed = spectral_norm(nn.Embedding(cfg.num_classes, widths[-1]))
        init_projgan_weights(self)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x: (B, 1, R, R) in [-1, 1], y: (B,) int64 class ids -> logits (B,)."""
        h = self.features(x)  # (B, C, 4, 4)
        phi = h.sum(dim=(2, 3))  # (B, C)
        out = self.linear(phi)[:, 0]  # (B,)
        proj = (self.embed(y).to(phi.dtype) * phi).sum(dim=1)  # (B,) <embed(y), phi(x)>
        return out + proj  # (B,)


def _raw_weight(module: nn.Module) -> Tensor:
    """The trained weight tensor: the original under a spectral-norm parametrization."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original  # type: ignore[union-attr,return-value]
    return module.weight  # type: ignore[return-value]


def _reset_spectral_norm(module: nn.Module, generator: torch.Generator | None) -> None:
    """Redraw the power-iteration vectors u, v of ``module``'s spectral norm from ``generator``.

    torch draws them from the global RNG when the parametrization is registered (and leaves
    them uninitialised after ``to_empty``); as there, 15 power iterations follow.
    """
    if not parametrize.is_parametrized(module, "weight"):
        return
    sn: Any = module.parametrizations.weight[0]  # type: ignore[union-attr,index]
    w = _raw_weight(module)
    with torch.no_grad():
        w_mat = w.movedim(sn.dim, 0).flatten(1)  # (h, w)
        u = torch.randn(w_mat.shape[0], generator=generator, dtype=w.dtype)  # (h,)
        u = F.normalize(u, dim=0, eps=sn.eps)
        v = u.new_empty(w_mat.shape[1])  # (w,)
        for _ in range(15):
            v = F.normalize(w_mat.T @ u, dim=0, eps=sn.eps)  # (w,)
            u = F.normalize(w_mat @ v, dim=0, eps=sn.eps)  # (h,)
        sn._u.copy_(u)
        sn._v.copy_(v)


def init_projgan_weights(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Initialise every parameter and buffer of ``module`` from ``generator``.

    Convolutions, linear layers and the discriminator's class embedding: Xavier-uniform (as in
    the SN-GAN and projection discriminator code), biases 0; conditional batch-norm scale
    offsets and shifts 0 (a plain batch norm at start); batch-norm running statistics reset;
    spectral-norm vectors redrawn. A seeded ``generator`` makes the result independent of the
    global RNG (also after ``to_empty``).
    """
    cbn_tables: set[int] = set()
    for m in module.modules():
        if isinstance(m, ConditionalBatchNorm2d):
            nn.init.zeros_(m.gamma.weight)
            nn.init.zeros_(m.beta.weight)
            cbn_tables.update((id(m.gamma), id(m.beta)))
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
        elif isinstance(m, nn.Conv2d | nn.Linear | nn.Embedding) and id(m) not in cbn_tables:
            with torch.no_grad():
                nn.init.xavier_uniform_(_raw_weight(m), generator=generator)
                bias = getattr(m, "bias", None)
                if bias is not None:
                    nn.init.zeros_(bias)
            _reset_spectral_norm(m, generator)


def build_seeded(
    cls: type[Generator] | type[Discriminator], cfg: ProjGANConfig, generator: torch.Generator
) -> nn.Module:
    """Build ``cls(cfg)`` on CPU with every parameter and buffer drawn from ``generator``.

    The network is first built on the meta device, so the global RNG is neither used nor advanced.
    """
    with torch.device("meta"):
        net = cls(cfg)
    net = net.to_empty(device="cpu")
    init_projgan_weights(net, generator)
    return net
