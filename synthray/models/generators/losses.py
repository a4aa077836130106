"""Adversarial losses, each as the pair (discriminator loss, generator loss) on logits.

- Non-saturating (Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014, Section 3):
  D minimises the BCE of real logits against 1 and of generated ones against 0, i.e. maximises
  log D(x) + log(1 - D(G(z))); G maximises log D(G(z)) instead of minimising
  log(1 - D(G(z))), which saturates early in training.
- Hinge (Lim and Ye, "Geometric GAN", 2017, arXiv:1705.02894; Miyato et al. 2018): D minimises
  E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))], G minimises -E[D(G(z))].

Logits arrive in the autocast dtype; every loss is computed in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (conventional alias)
from torch import Tensor


def _nonsaturating_d(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    real, fake = logits_real.float(), logits_fake.float()  # (B,), (B,)
    return F.binary_cross_entropy_with_logits(
        real, torch.ones_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def _nonsaturating_g(logits_gen: Tensor) -> Tensor:
    gen = logits_gen.float()  # (B,)
    return F.binary_cross_entropy_with_logits(gen, torch.ones_like(gen))


def _hinge_d(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()


def _hinge_g(logits_gen: Tensor) -> Tensor:
    return -logits_gen.float().mean()


@dataclass(frozen=True)
class AdversarialLoss:
    name: str
    discriminator: Callable[[Tensor, Tensor], Tensor]  # (logits_real, logits_fake) -> scalar
    generator: Callable[[Tensor], Tensor]  # logits of generated images -> scalar


NON_SATURATING = AdversarialLoss("non-saturating", _nonsaturating_d, _nonsaturating_g)
HINGE = AdversarialLoss("hinge", _hinge_d, _hinge_g)
