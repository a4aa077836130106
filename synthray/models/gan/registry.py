"""Every generator architecture SynthRay can train, in one table.

An :class:`Architecture` names the networks' config class, the generator and discriminator
classes, how to build them from a seeded RNG, the adversarial loss, and the values that
:class:`~synthray.models.gan.config.TrainConfig` fields left at None take. The training loop,
the generator files and the sampler look architectures up here and nowhere else, so adding a
generator is one network file plus one entry in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from synthray.models.gan import dcgan, projgan
from synthray.models.gan.losses import HINGE, NON_SATURATING, AdversarialLoss

GeneratorConfig = dcgan.DCGANConfig | projgan.ProjGANConfig


@dataclass(frozen=True)
class Architecture:
    name: str
    config: type[GeneratorConfig]  # a dataclass with to_dict / from_dict
    generator: type[nn.Module]  # G(cfg); called as G(z, y) -> (B, 1, R, R) in [-1, 1]
    discriminator: type[nn.Module]  # D(cfg); called as D(x, y) -> logits (B,)
    build_seeded: Callable[[Any, Any, torch.Generator], nn.Module]  # (cls, cfg, rng) -> net
    loss: AdversarialLoss
    defaults: Mapping[str, Any]  # TrainConfig fields left at None
    resolutions: tuple[int, ...]

    def build(self, cfg: GeneratorConfig, rng: torch.Generator) -> tuple[nn.Module, nn.Module]:
        """Generator and discriminator, every weight drawn from ``rng`` (G first)."""
        g = self.build_seeded(self.generator, cfg, rng)
        return g, self.build_seeded(self.discriminator, cfg, rng)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        # The seed study's baseline: non-saturating loss, no augmentation, no EMA.
        Architecture(
            name="dcgan",
            config=dcgan.DCGANConfig,
            generator=dcgan.Generator,
            discriminator=dcgan.Discriminator,
            build_seeded=dcgan.build_seeded,
            loss=NON_SATURATING,
            defaults=MappingProxyType(
                {
                    "g_channels": 64,
                    "d_channels": 64,
                    "augment": "none",
                    "ema_decay": 0.0,
                    "class_power": 0.0,
                }
            ),
            resolutions=dcgan.SUPPORTED_RESOLUTIONS,
        ),
        # Spectral norm, projection discriminator, hinge loss, DiffAugment and EMA.
        Architecture(
            name="projgan",
            config=projgan.ProjGANConfig,
            generator=projgan.Generator,
            discriminator=projgan.Discriminator,
            build_seeded=projgan.build_seeded,
            loss=HINGE,
            defaults=MappingProxyType(
                {
                    "g_channels": 32,
                    "d_channels": 64,
                    "augment": "color,translation,cutout",
                    "ema_decay": 0.999,
                    "class_power": 0.5,
                }
            ),
            resolutions=projgan.SUPPORTED_RESOLUTIONS,
        ),
    )
}


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
