"""Drawing labelled synthetic images from a trained class-conditional generator."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from synthray.models.runtime import cpu_compute_dtype, resolve_device, to_channels_last

_SEED_MASK = (1 << 63) - 1

# On CPU, a latent generator's batch is sized so that one velocity-network pass works on
# about this many latent positions (batch x side^2): its activations then stay in the
# caches across the many passes of an ODE solve. At 128 px (32 x 32 latent, batch 32) that
# drew 32.5 img/s against 17.5 at batch 256 on a 2-core Zen 4 in bf16; at 64 px (16 x 16,
# batch 128) and for the GANs (one pass per image) the batch made no difference beyond
# noise. CUDA keeps the large batch.
CPU_LATENT_POSITIONS = 32 * 32 * 32
LARGE_BATCH = 256


def default_batch_size(cfg: Any, device: torch.device) -> int:
    """Images per generator call when the caller does not say: ``LARGE_BATCH`` on CUDA
    and for generators without a latent grid, else ``CPU_LATENT_POSITIONS / side^2``
    (within [8, ``LARGE_BATCH``])."""
    side = getattr(cfg, "latent_size", None)
    if device.type != "cpu" or not side:
        return LARGE_BATCH
    return max(8, min(LARGE_BATCH, CPU_LATENT_POSITIONS // int(side) ** 2))


def derived_seed(seed: int, key: int) -> int:
    """An independent 63-bit seed per (seed, key): per class here, so one class's images do
    not depend on which other classes are requested; per draw in the evaluation job."""
    words = np.random.SeedSequence([seed, key]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & _SEED_MASK


def sample_images(
    generator: nn.Module,
    counts: dict[int, int],
    *,
    seed: int,
    batch_size: int | None = None,
    device: str = "auto",
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``counts[c]`` images of every class ``c``.

    ``generator`` is any class-conditional generator called as ``generator(z, y)`` with z
    (B, z_dim) and y (B,) int64, returning (B, 1, R, R) in [-1, 1], whose ``.cfg`` names
    ``num_classes``, ``z_dim`` and ``resolution`` (every registered generator does; the
    latent flow's integrates its ODE inside that call).

    Returns uint8 images (N, R, R) ([-1, 1] mapped to [0, 255], rounded and clipped) and int64
    labels (N,), ordered by class id, then by index within the class. The latent codes of class
    ``c`` come from a generator seeded with (seed, c), so the result is deterministic given the
    seed. The generator runs in eval mode (batch-norm running statistics) on a copy, so the
    caller's module is not moved or switched; on CPU it runs in channels_last, with bf16
    autocast where the CPU has bf16 units (:mod:`synthray.models.runtime`), on CUDA with bf16
    (or fp16) autocast. ``batch_size`` images go through the generator at a time
    (:func:`default_batch_size` when None; under bf16 another batch size can move a few
    pixels by one grey level, as the kernels' summation order changes).
    ``on_progress(done, total)`` is called after every batch.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg: Any = getattr(generator, "cfg", None)
    if not all(hasattr(cfg, a) for a in ("num_classes", "z_dim", "resolution")):
        raise TypeError("generator.cfg must give num_classes, z_dim and resolution")
    for c, n in counts.items():
        if not 0 <= int(c) < cfg.num_classes:
            raise ValueError(f"class id {c} outside [0, {cfg.num_classes})")
        if int(n) < 0:
            raise ValueError(f"negative count {n} for class {c}")
    dev = resolve_device(device)
    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = cpu_compute_dtype()
    net = copy.deepcopy(generator).to(dev).eval()
    if batch_size is None:
        batch_size = default_batch_size(cfg, dev)
    to_channels_last(net)

    r = cfg.resolution
    total = sum(int(n) for n in counts.values())
    images = np.empty((total, r, r), dtype=np.uint8)  # (N, R, R)
    labels = np.empty((total,), dtype=np.int64)  # (N,)
    pos = 0
    with (
        torch.inference_mode(),
        torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32),
    ):
        for c in sorted(int(k) for k in counts):
            n = int(counts[c])
            if n == 0:
                continue
            rng = torch.Generator(device="cpu")
            rng.manual_seed(derived_seed(seed, c))
            z_all = torch.randn(n, cfg.z_dim, generator=rng)  # (n, z_dim)
            for start in range(0, n, batch_size):
                z = z_all[start : start + batch_size].to(dev)  # (b, z_dim)
                y = torch.full((z.shape[0],), c, dtype=torch.long, device=dev)  # (b,)
                x = net(z, y).float()  # (b, 1, R, R) in [-1, 1]
                x = ((x + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
                b = x.shape[0]
                images[pos : pos + b] = x[:, 0].cpu().numpy()  # (b, R, R)
                labels[pos : pos + b] = c
                pos += b
                if on_progress is not None:
                    on_progress(pos, total)
    return images, labels
