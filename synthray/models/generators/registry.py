"""Every generator architecture SynthRay can train, in one table.

An :class:`Architecture` names its family (which training loop trains it:
:data:`synthray.models.generators.training.TRAINERS`), the generator's config class and
network, which :class:`~synthray.models.generators.config.TrainConfig` fields it has and their
defaults, which of them build the generator's config, and the resolutions it supports. GANs
add their discriminator, seeded builder and adversarial loss (:class:`GanParts`). The training
loops, the generator files and the sampler look architectures up here and nowhere else, so
adding a generator is one network file plus one entry in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from synthray.models.generators import dcgan, latentflow, projgan
from synthray.models.generators.losses import HINGE, NON_SATURATING, AdversarialLoss

GeneratorConfig = dcgan.DCGANConfig | projgan.ProjGANConfig | latentflow.LatentFlowConfig

GAN = "gan"
LATENT_FLOW = "latent-flow"


@dataclass(frozen=True)
class GanParts:
    discriminator: type[nn.Module]  # D(cfg); called as D(x, y) -> logits (B,)
    build_seeded: Callable[[Any, Any, torch.Generator], nn.Module]  # (cls, cfg, rng) -> net
    loss: AdversarialLoss


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str  # GAN or LATENT_FLOW
    config: type[GeneratorConfig]  # a dataclass with to_dict / from_dict
    generator: type[nn.Module]  # G(cfg); called as G(z, y) -> (B, 1, R, R) in [-1, 1]
    defaults: Mapping[str, Any]  # this architecture's own TrainConfig fields and defaults
    config_fields: tuple[str, ...]  # TrainConfig fields that go into the generator config
    resolutions: tuple[int, ...]
    gan: GanParts | None = None
    # Defaults that depend on the resolution; they win over ``defaults``.
    resolution_defaults: Mapping[int, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # Defaults for a run in fp32 on a CPU (one without bf16 units), by resolution; they win
    # over both of the above there.
    cpu_fp32_defaults: Mapping[int, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def defaults_at(self, resolution: int, *, cpu_fp32: bool = False) -> dict[str, Any]:
        """This architecture's TrainConfig defaults for a run at ``resolution`` (``cpu_fp32``:
        a run in fp32 on a CPU)."""
        out = dict(self.defaults) | dict(self.resolution_defaults.get(resolution, {}))
        if cpu_fp32:
            out |= dict(self.cpu_fp32_defaults.get(resolution, {}))
        return out

    def build(self, cfg: GeneratorConfig, rng: torch.Generator) -> tuple[nn.Module, nn.Module]:
        """A GAN's generator and discriminator, every weight drawn from ``rng`` (G first)."""
        if self.gan is None:
            raise ValueError(f"{self.name} is not a GAN")
        g = self.gan.build_seeded(self.generator, cfg, rng)
        return g, self.gan.build_seeded(self.gan.discriminator, cfg, rng)


_GAN_DEFAULTS = {
    "batch_size": 64,
    "lr_g": 2e-4,
    "lr_d": 2e-4,
    "beta1": 0.5,
    "beta2": 0.999,
    "z_dim": 100,
}
_GAN_CONFIG_FIELDS = ("z_dim", "g_channels", "d_channels")

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        # The seed study's baseline: non-saturating loss, no augmentation, no EMA.
        Architecture(
            name="dcgan",
            family=GAN,
            config=dcgan.DCGANConfig,
            generator=dcgan.Generator,
            defaults=MappingProxyType(
                _GAN_DEFAULTS
                | {
                    "g_channels": 64,
                    "d_channels": 64,
                    "augment": "none",
                    "ema_decay": 0.0,
                    "class_power": 0.0,
                }
            ),
            config_fields=_GAN_CONFIG_FIELDS,
            resolutions=dcgan.SUPPORTED_RESOLUTIONS,
            gan=GanParts(dcgan.Discriminator, dcgan.build_seeded, NON_SATURATING),
        ),
        # Spectral norm, projection discriminator, hinge loss, DiffAugment and EMA.
        Architecture(
            name="projgan",
            family=GAN,
            config=projgan.ProjGANConfig,
            generator=projgan.Generator,
            defaults=MappingProxyType(
                _GAN_DEFAULTS
                | {
                    "g_channels": 32,
                    "d_channels": 64,
                    "augment": "color,translation,cutout",
                    "ema_decay": 0.999,
                    "class_power": 0.5,
                }
            ),
            config_fields=_GAN_CONFIG_FIELDS,
            resolutions=projgan.SUPPORTED_RESOLUTIONS,
            gan=GanParts(projgan.Discriminator, projgan.build_seeded, HINGE),
        ),
        # A site autoencoder, then class-conditional flow matching on its latents (16 x 16,
        # 32 x 32 at 128 and 256 px), sampled with classifier-free guidance.
        Architecture(
            name="latentflow",
            family=LATENT_FLOW,
            config=latentflow.LatentFlowConfig,
            generator=latentflow.Generator,
            defaults=MappingProxyType(
                {
                    # Small batches of a narrow velocity field, so that a 2-core fp32 CPU
                    # makes enough flow steps in the demo's budget to draw radiographs
                    # (docs/measurements.md, "Measured: the demo, run by run").
                    "batch_size": 32,
                    "ema_decay": 0.995,
                    "class_power": 0.5,
                    "ae_fraction": 0.25,
                    "ae_batch_size": 32,
                    # 64 px crops until the last quarter of the autoencoder's phase: no
                    # change at 64 px; at 128 px 2.9x the steps in the same seconds and
                    # sharper reconstructions (docs/measurements.md, "The autoencoder's ceiling").
                    "ae_crop": 64,
                    "lr_ae": 2e-3,
                    "lr_flow": 1e-3,
                    # The flow's learning rate falls to 0 over its last fifth: at 128 px
                    # supervised FID 4.3 against 6.7 and TSTR 0.612 against 0.594 (one run
                    # each; docs/measurements.md, "Measured: Kermany at 64 and 128 px").
                    "flow_cooldown": 0.2,
                    "latent_size": 16,
                    "latent_channels": 4,
                    "ae_width": 16,
                    "flow_width": 32,
                    "label_dropout": 0.1,
                    "guidance": 2.0,
                    "sample_steps": 8,
                    "guidance_interval": None,  # guided at every step
                }
            ),
            config_fields=(
                "latent_size",
                "latent_channels",
                "ae_width",
                "flow_width",
                "guidance",
                "sample_steps",
                "guidance_interval",
            ),
            resolutions=latentflow.SUPPORTED_RESOLUTIONS,
            resolution_defaults=MappingProxyType(
                {
                    # A 32 x 32 latent at 128 px (the autoencoder halves the side twice, as
                    # at 64 px, not three times): on a 2-core Zen 4, 1,800 s, one run each,
                    # TSTR 0.660 against 0.556 with the 16 x 16 latent (85% of real against
                    # 72%), sharper films, for 2.2x the flow's cost per step (docs/measurements.md,
                    # "Measured: Kermany at 64 and 128 px").
                    # Guidance only at t <= 0.5 (the less noisy half of the path): on one
                    # 128 px Kermany version (Xeon, 2 classifier seeds, ungated draws of
                    # 4,137) TSTR 0.662 against 0.653 guided throughout, supervised FID 1.5
                    # against 32.6 (floor 0.67), 1.47x the images per second (docs/measurements.md,
                    # "Guidance on part of the path"). At 64 px it measured worse (Kermany,
                    # 300 s, TSTR 72.0% against 80.9% of DS1, supervised FID 33.5 against
                    # 9.8), so 64 px guides every step.
                    # Weight 3 there: on that Xeon version TSTR 86.1% of DS1 against 84.7%
                    # at 2; on a Zen 3 version (seed 8, one draw of 900, compared in the
                    # training mix on five subsamples) supervised FID 1.00-1.23 against
                    # 2.47-2.74 at 2, floor 0.34-1.00 (docs/measurements.md, "How far the
                    # floor moves with the subsample alone"). Through the product (one run, seed 9,
                    # bf16 Zen 4): TSTR 92.2% of DS1; supervised FID 5.1x its floor
                    # unselected, 3.1x as synthesis chooses, against 6.2x and more at
                    # weight 2 on the same version (docs/measurements.md, "Weight 3 through
                    # the product").
                    128: MappingProxyType(
                        {"latent_size": 32, "guidance": 3.0, "guidance_interval": [0.0, 0.5]}
                    ),
                    # 256 px: the same 32 x 32 latent (an 8x autoencoder), so a flow step
                    # costs what it costs at 128 px, and guidance as at 128 px. One run
                    # (2-core AMD EPYC, 1,800 s): recognizable films of each class,
                    # self-supervised FID 2.9x its floor, TSTR 72.9% of real with the viral
                    # class lost (docs/measurements.md, "256 px on 2 CPU cores"); no 16 x 16
                    # run to compare.
                    256: MappingProxyType(
                        {"latent_size": 32, "guidance": 3.0, "guidance_interval": [0.0, 0.5]}
                    ),
                }
            ),
            # In fp32 on a CPU a flow step on the 32 x 32 latent costs about 0.4 s at batch 32;
            # half the batch makes 1.8x the steps in the same seconds, and the flow is far from
            # fitting its data at these budgets, so more steps of fewer images win: held-out
            # flow loss 0.661 against 0.674 after 400 s, and through the product (128 px,
            # 1,800 s, bf16 switched off with SYNTHRAY_CPU_BF16=off, one generator run each)
            # TSTR 85.9% (Xeon) and 88.3% (Zen 4) of real where batch 32 gave 79.6% on a
            # Zen 3; the exported pool's FID 2.8x and 3.7x its floor against 2.1x
            # (docs/measurements.md,
            # "Batch size on a CPU without bf16 units"). 256 px runs its flow on the same
            # 32 x 32 latent, so the same step costs the same there (no 256 px fp32 run with
            # it yet). 64 px (16 x 16 latent, 2.2x cheaper steps) keeps 32. bf16 keeps 32:
            # there half the batch led by less in a proxy run and no product run was made.
            cpu_fp32_defaults=MappingProxyType(
                {
                    128: MappingProxyType({"batch_size": 16}),
                    256: MappingProxyType({"batch_size": 16}),
                }
            ),
        ),
    )
}

DEFAULT_ARCHITECTURE = "latentflow"


def get(name: str) -> Architecture:
    """The architecture called ``name``; ValueError naming the supported ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; supported: {list(ARCHITECTURES)}"
        ) from None


def architecture_of(generator_config: Mapping[str, Any]) -> str:
    """The architecture whose config has exactly these keys (their key sets differ)."""
    keys = set(generator_config)
    for a in ARCHITECTURES.values():
        if keys == {f.name for f in fields(a.config)}:
            return a.name
    raise ValueError(
        f"generator config keys {sorted(keys)} match no architecture; pass architecture="
    )
