"""Class-conditional flow matching in the latent space of a site autoencoder.

The generative model is a velocity field v(z_t, t, y) on the autoencoder's latent grid
(:mod:`synthray.models.generators.autoencoder`), trained by conditional flow matching on the
straight path between data and noise, z_t = (1 - t) z_0 + t e with e ~ N(0, I), regressing
v onto e - z_0 ("rectified flow": Liu, Gong and Liu, ICLR 2023, arXiv:2209.03003; Lipman et
al., "Flow Matching for Generative Modeling", ICLR 2023, arXiv:2210.02747). Training times t
are logit-normal (Esser et al., "Scaling Rectified Flow Transformers", ICML 2024, the SD3
paper), which spends the steps on intermediate noise levels.

The class enters through an embedding added to the time embedding; a (num_classes + 1)-th
"no class" embedding is trained by dropping labels at random, so sampling can use
classifier-free guidance (Ho and Salimans, arXiv:2207.12598, 2022): v = v_u + w (v_c - v_u).
Guidance above 1 trades diversity for images that look more like their class. It can be
limited to an interval of noise levels (``guidance_interval``, in flow time t; outside it
the conditional velocity alone is used, one network evaluation instead of two; after
Kynkaanniemi et al., "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models", NeurIPS 2024, arXiv:2404.07724). Guidance near
pure noise mostly removes diversity; on chest films at 128 px the class detail a classifier
learns from was added in the less noisy half (docs/measurements.md, "Guidance on part of the path").

The network is a small U-Net (Ronneberger et al. 2015; as in Ho et al. 2020, DDPM) over the
latent grid: residual blocks with group norm, whose normalised features are scaled and
shifted by the embedding ("adaptive group norm", Dhariwal and Nichol, NeurIPS 2021), two
levels (S and S / 2), skip connections by concatenation.

:class:`Generator` bundles the velocity field, the autoencoder's decoder and the latents'
per-channel statistics, and is called like the GANs' generators, ``G(z, y)``: z (B, z_dim)
is the flattened initial noise, the probability-flow ODE is integrated from t = 1 to t = 0
with Heun's method (``sample_steps`` steps, 2 * steps - 1 velocity evaluations), and the
latent is decoded. The result depends only on z, y and the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from synthray.models.generators.autoencoder import (
    AutoencoderConfig,
    Decoder,
    ResBlock,
    group_norm,
)

SUPPORTED_RESOLUTIONS = (64, 128, 256)
TIME_FEATURES = 64


@dataclass
class LatentFlowConfig:
    """Everything that rebuilds the generator (stored in every generator file)."""

    resolution: int = 64
    num_classes: int = 2
    latent_size: int = 16
    latent_channels: int = 4
    ae_width: int = 16
    flow_width: int = 32
    emb_dim: int = 128
    sample_steps: int = 8
    guidance: float = 2.0
    # Per class, overriding ``guidance`` (set by the train job, which tapers the guidance
    # of classes with few training patients: see ``tapered_guidance``).
    class_guidance: list[float] | None = None
    # (t_low, t_high): guidance only where t_low < t <= t_high (t = 1 is pure noise); None
    # guides at every t.
    guidance_interval: list[float] | None = None

    def __post_init__(self) -> None:
        if self.resolution not in SUPPORTED_RESOLUTIONS:
            raise ValueError(
                f"latentflow resolution must be one of {SUPPORTED_RESOLUTIONS}, "
                f"got {self.resolution}"
            )
        for name in ("num_classes", "flow_width", "emb_dim", "sample_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.latent_size % 2:
            raise ValueError(f"latent_size must be even, got {self.latent_size}")
        if not (isinstance(self.guidance, int | float) and 0 <= self.guidance <= 20):
            raise ValueError(f"guidance must be in [0, 20], got {self.guidance!r}")
        if self.class_guidance is not None:
            self.class_guidance = [float(w) for w in self.class_guidance]
            if len(self.class_guidance) != self.num_classes or not all(
                0 <= w <= 20 for w in self.class_guidance
            ):
                raise ValueError("class_guidance needs one weight in [0, 20] per class")
        if self.guidance_interval is not None:
            self.guidance_interval = [float(t) for t in self.guidance_interval]
            if len(self.guidance_interval) != 2 or not (
                0.0 <= self.guidance_interval[0] < self.guidance_interval[1] <= 1.0
            ):
                raise ValueError(
                    "guidance_interval needs two times 0 <= t_low < t_high <= 1, "
                    f"got {self.guidance_interval!r}"
                )
        self.autoencoder()  # validates resolution / latent size / widths

    def autoencoder(self) -> AutoencoderConfig:
        return AutoencoderConfig(
            resolution=self.resolution,
            latent_size=self.latent_size,
            latent_channels=self.latent_channels,
            width=self.ae_width,
        )

    @property
    def z_dim(self) -> int:
        """Length of the flattened noise a sample starts from."""
        return self.latent_channels * self.latent_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentFlowConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LatentFlowConfig keys: {sorted(unknown)}")
        return cls(**d)


def tapered_guidance(guidance: float, patients: list[int], full: int) -> list[float]:
    """Per-class guidance: ``guidance`` for a class with at least ``full`` training
    patients, tapered linearly towards 1 (no guidance) below that,
    w_c = 1 + (w - 1) min(1, p_c / full).

    Guidance pulls a class's samples towards what is typical of its training images; with a
    handful of patients, that is those patients, and the memorization gate flags the
    samples as near-copies. Weights of 1 or below are left as they are."""
    if guidance <= 1.0:
        return [float(guidance)] * len(patients)
    return [1.0 + (guidance - 1.0) * min(1.0, p / max(full, 1)) for p in patients]


def time_features(t: Tensor) -> Tensor:
    """(B,) in [0, 1] -> (B, TIME_FEATURES) sinusoids (Vaswani et al. 2017), t scaled by 1000."""
    half = TIME_FEATURES // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )  # (half,)
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class VelocityNet(nn.Module):
    """v(z_t, t, y): (B, C, S, S), (B,), (B,) -> (B, C, S, S). Label ``num_classes`` means
    "no class" (the unconditional branch of classifier-free guidance)."""

    BLOCKS_PER_LEVEL = 2

    def __init__(self, cfg: LatentFlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, e = cfg.latent_channels, cfg.emb_dim
        widths = (cfg.flow_width, 2 * cfg.flow_width)  # at sides S and S / 2
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FEATURES, e), nn.SiLU(), nn.Linear(e, e))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, e)
        self.inp = nn.Conv2d(c, widths[0], 3, padding=1)

        skips = [widths[0]]
        ch = widths[0]
        self.down1 = nn.ModuleList()
        for _ in range(self.BLOCKS_PER_LEVEL):
            self.down1.append(ResBlock(ch, widths[0], norm=True, emb_dim=e))
            ch = widths[0]
            skips.append(ch)
        self.downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)  # S -> S / 2
        skips.append(ch)
        self.down2 = nn.ModuleList()
        for _ in range(self.BLOCKS_PER_LEVEL):
            self.down2.append(ResBlock(ch, widths[1], norm=True, emb_dim=e))
            ch = widths[1]
            skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, norm=True, emb_dim=e) for _ in range(2)])
        self.up2 = nn.ModuleList()
        for _ in range(self.BLOCKS_PER_LEVEL + 1):
            self.up2.append(ResBlock(ch + skips.pop(), widths[1], norm=True, emb_dim=e))
            ch = widths[1]
        self.upsample = nn.Upsample(scale_factor=2.0, mode="nearest")  # S / 2 -> S
        self.up1 = nn.ModuleList()
        for _ in range(self.BLOCKS_PER_LEVEL + 1):
            self.up1.append(ResBlock(ch + skips.pop(), widths[0], norm=True, emb_dim=e))
            ch = widths[0]
        self.out_norm = group_norm(ch)
        self.out = nn.Conv2d(ch, c, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # the untrained field is 0 everywhere
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]

    def forward(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        emb = self.time_mlp(time_features(t)) + self.class_emb(y)  # (B, E)
        h = self.inp(z)  # (B, W, S, S)
        hs = [h]
        for block in self.down1:
            h = block(h, emb)
            hs.append(h)
        h = self.downsample(h)  # (B, W, S/2, S/2)
        hs.append(h)
        for block in self.down2:
            h = block(h, emb)  # (B, 2W, S/2, S/2)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up2:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)  # (B, 2W, S/2, S/2)
        h = self.upsample(h)  # (B, 2W, S, S)
        for block in self.up1:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)  # (B, W, S, S)
        return self.out(nn.functional.silu(self.out_norm(h)))  # (B, C, S, S)


class Generator(nn.Module):
    """(z, y) -> (B, 1, R, R) in [-1, 1]: integrate the guided flow from noise z, decode.

    Buffers ``latent_mean`` and ``latent_std`` (1, C, 1, 1) undo the per-channel
    standardisation the flow was trained in.
    """

    latent_mean: Tensor
    latent_std: Tensor

    def __init__(self, cfg: LatentFlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.velocity = VelocityNet(cfg)
        self.decoder = Decoder(cfg.autoencoder())
        shape = (1, cfg.latent_channels, 1, 1)
        self.register_buffer("latent_mean", torch.zeros(shape))
        self.register_buffer("latent_std", torch.ones(shape))

    def guidance_of(self, y: Tensor) -> Tensor:
        """(B, 1, 1, 1) guidance weight of each row's class."""
        per_class = self.cfg.class_guidance or [float(self.cfg.guidance)] * self.cfg.num_classes
        w = torch.tensor(per_class, dtype=torch.float32, device=y.device)[y]
        return w[:, None, None, None]

    def guides_at(self, t: float) -> bool:
        """Whether guidance applies at flow time t (``guidance_interval``)."""
        interval = self.cfg.guidance_interval
        return interval is None or interval[0] < t <= interval[1]

    def guided_velocity(self, z: Tensor, t: float, y: Tensor) -> Tensor:
        """v_u + w (v_c - v_u) at time t for every row of z, in fp32 (v_c alone outside the
        guidance interval)."""
        b = z.shape[0]
        w = self.guidance_of(y)
        tt = torch.full((b,), t, device=z.device)
        if bool((w == 1.0).all()) or not self.guides_at(t):
            return self.velocity(z, tt, y).float()
        null = torch.full_like(y, self.cfg.num_classes)
        v = self.velocity(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([y, null])).float()
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + w * (v_cond - v_uncond)

    def latents(self, z: Tensor, y: Tensor) -> Tensor:
        """Heun's method on dz/dt = v from t = 1 (z) to t = 0; (B, C, S, S), standardised."""
        cfg = self.cfg
        x = z.float().view(z.shape[0], cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        if self.velocity.inp.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        ts = torch.linspace(1.0, 0.0, cfg.sample_steps + 1).tolist()
        for i in range(cfg.sample_steps):
            t, t_next = ts[i], ts[i + 1]
            dt = t_next - t
            k1 = self.guided_velocity(x, t, y)
            if i == cfg.sample_steps - 1:  # the last step is Euler (no evaluation at t = 0)
                x = x + dt * k1
            else:
                k2 = self.guided_velocity(x + dt * k1, t_next, y)
                x = x + 0.5 * dt * (k1 + k2)
        return x

    def decode(self, latents: Tensor) -> Tensor:
        """Standardised latents -> images in [-1, 1]."""
        mean = self.latent_mean.to(latents.device)
        std = self.latent_std.to(latents.device)
        return self.decoder(latents * std + mean).float().clamp(-1.0, 1.0)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        """z: (B, z_dim) float, y: (B,) int64 class ids -> (B, 1, R, R) in [-1, 1]."""
        return self.decode(self.latents(z, y))


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def build_seeded(factory: Callable[[], ModuleT], generator: torch.Generator) -> ModuleT:
    """``factory()`` (a :class:`Generator`, :class:`VelocityNet` or an autoencoder) on CPU,
    every weight drawn from ``generator`` and never from the global RNG (the network is
    first built on the meta device)."""
    with torch.device("meta"):
        net = factory()
    net = net.to_empty(device="cpu")
    init_weights(net, generator)
    return net


def init_weights(net: nn.Module, generator: torch.Generator) -> None:
    """Re-draw every parameter of ``net`` from ``generator`` as PyTorch's own
    ``reset_parameters`` would, keep the zero-initialised last layers at zero, and set the
    norm layers and latent statistics to identity."""
    zero: set[int] = set()
    for m in net.modules():
        if isinstance(m, ResBlock):
            zero.add(id(m.conv2))
        if isinstance(m, VelocityNet):
            zero.add(id(m.out))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                if id(m) in zero:
                    nn.init.zeros_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                    continue
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                if m.bias is not None:
                    fan_in = m.weight[0].numel()
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, generator=generator)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name, buf in net.named_buffers():
            if name.endswith("latent_mean"):
                buf.zero_()
            elif name.endswith("latent_std"):
                buf.fill_(1.0)
