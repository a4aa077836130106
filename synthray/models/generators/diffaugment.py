"""Differentiable augmentation of the discriminator's inputs, for GANs trained on few images.

Zhao, Liu, Lin, Zhu and Han, "Differentiable Augmentation for Data-Efficient GAN Training",
NeurIPS 2020 (arXiv:2006.10738): the same random transformations are applied to real and to
generated images before the discriminator sees them, in the discriminator's and in the
generator's update. They are differentiable, so the generator is trained through them and still
learns the un-augmented distribution, while the discriminator cannot memorise the few real
images. The transforms and their strengths are those of the paper's ``color,translation,cutout``
policy, minus saturation (the images are grey) and with no flips of any kind: chest radiographs
are not left-right symmetric (the heart is on the left).

All random numbers come from the caller's ``torch.Generator`` on CPU, in a fixed order, so a
training run stays deterministic and resumable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 (conventional alias)
from torch import Tensor

TRANSFORMS = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125  # at most 1/8 of the side in each direction
CUTOUT_RATIO = 0.5  # a square of half the side


def parse_policy(policy: str) -> tuple[str, ...]:
    """``"none"`` or ``""`` -> (); else comma-separated names from TRANSFORMS, applied in the
    order of TRANSFORMS (colour first, as in the paper)."""
    names = [p.strip() for p in policy.split(",") if p.strip()]
    if names in ([], ["none"]):
        return ()
    unknown = sorted(set(names) - set(TRANSFORMS))
    if unknown:
        raise ValueError(
            f"unknown augmentation {unknown}; use 'none' or a comma list of {list(TRANSFORMS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"augmentation policy {policy!r} repeats a transform")
    return tuple(t for t in TRANSFORMS if t in names)


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, 1, 1, 1, generator=generator).to(device)  # (B, 1, 1, 1) in [0, 1)


def brightness_contrast(x: Tensor, generator: torch.Generator) -> Tensor:
    """Add U(-0.5, 0.5) to every pixel, then scale about the image mean by U(0.5, 1.5)."""
    b = x.shape[0]
    brightness = _uniform(b, generator, x.device) - 0.5  # (B, 1, 1, 1)
    contrast = _uniform(b, generator, x.device) + 0.5  # (B, 1, 1, 1)
    x = x + brightness.to(x.dtype)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (x - mean) * contrast.to(x.dtype) + mean


def translate(x: Tensor, generator: torch.Generator, ratio: float = TRANSLATION_RATIO) -> Tensor:
    """Shift every image by its own integer offset in [-ratio * side, ratio * side] along each
    axis; pixels shifted in are 0 (mid-grey in [-1, 1]). No flip, no rotation."""
    b, _, h, w = x.shape
    max_y, max_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    shift_y = torch.randint(-max_y, max_y + 1, (b, 1, 1), generator=generator).to(x.device)
    shift_x = torch.randint(-max_x, max_x + 1, (b, 1, 1), generator=generator).to(x.device)
    grid_b, grid_y, grid_x = torch.meshgrid(
        torch.arange(b, device=x.device),
        torch.arange(h, device=x.device),
        torch.arange(w, device=x.device),
        indexing="ij",
    )  # each (B, H, W)
    # Output pixel (i, j) reads input pixel (i + dy, j + dx); index 0 and side + 1 are padding.
    src_y = (grid_y + shift_y + 1).clamp_(0, h + 1)  # (B, H, W)
    src_x = (grid_x + shift_x + 1).clamp_(0, w + 1)  # (B, H, W)
    padded = F.pad(x, [1, 1, 1, 1])  # (B, C, H + 2, W + 2)
    out = padded.permute(0, 2, 3, 1)[grid_b, src_y, src_x]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)  # (B, C, H, W)


def cutout(x: Tensor, generator: torch.Generator, ratio: float = CUTOUT_RATIO) -> Tensor:
    """Set a (ratio * side)-square at a random centre of every image to 0 (mid-grey); the square
    may be clipped by the border."""
    b, _, h, w = x.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + 1, (b, 1, 1, 1), generator=generator).to(x.device) - size_y // 2
    left = torch.randint(0, w + 1, (b, 1, 1, 1), generator=generator).to(x.device) - size_x // 2
    ys = torch.arange(h, device=x.device).view(1, 1, h, 1)  # (1, 1, H, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, 1, w)  # (1, 1, 1, W)
    inside = (ys >= top) & (ys < top + size_y) & (xs >= left) & (xs < left + size_x)
    return x * (~inside).to(x.dtype)  # (B, C, H, W)


def diff_augment(x: Tensor, policy: Sequence[str], generator: torch.Generator) -> Tensor:
    """Apply the transforms named in ``policy`` (see :func:`parse_policy`) to ``x``.

    x: (B, C, H, W) images in [-1, 1] (real or generated, any float dtype) -> same shape and
    dtype. Every image gets its own random parameters, drawn from ``generator``.
    """
    for name in policy:
        if name == "color":
            x = brightness_contrast(x, generator)
        elif name == "translation":
            x = translate(x, generator)
        elif name == "cutout":
            x = cutout(x, generator)
        else:
            raise ValueError(f"unknown augmentation {name!r}")
    return x
