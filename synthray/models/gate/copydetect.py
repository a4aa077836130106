"""A small learned copy-detection and patient re-identification embedding, trained on site.

Pixel correlation misses copies that were edited more than a few pixels' worth. Copy detection
learns an embedding in which an image and its edited copies stay close: SSCD (Pizzi et al., "A
Self-Supervised Descriptor for Image Copy Detection", CVPR 2022) trains it contrastively with
InfoNCE / NT-Xent (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020; van den Oord et al., "Representation Learning with Contrastive
Predictive Coding", 2018), positives being two strong augmentations of one image. Chest
radiographs also identify their patient (Packhaeuser et al., "Deep learning-based patient
re-identification is able to exploit the biometric nature of medical chest X-ray data",
Scientific Reports 2022), so when patient keys are given, two images of the same patient are
positives too, with the multi-positive loss of Khosla et al., "Supervised Contrastive Learning",
NeurIPS 2020 (L_out):

    L_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )

The network is trained from scratch on the site's own training images (no downloaded weights),
deterministically for a given seed and step count, channels_last on CPU, with bf16 autocast where
the CPU has bf16 units (:mod:`synthray.models.runtime`).
Checkpoints are safetensors files with the config in their metadata, checked by sha256 on load.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (conventional alias)
from torch import Tensor, nn

from synthray.models.checkpoint import load_state, save_state
from synthray.models.gate.imageops import unit_films
from synthray.models.gate.search import torch_threads
from synthray.models.runtime import cpu_autocast

KIND = "copydetect"


@dataclass
class CopyDetectConfig:
    """Everything that determines the network and its training (stored in every checkpoint)."""

    resolution: int = 64  # of the images it embeds
    # The side the network sees: larger images are area-downsampled to it first. A 128 px
    # dataset's embedding trained at 64 px made 3.3x the steps in the same 300 s and found
    # more copies (README, "Does it work?").
    work_size: int = 64
    width: int = 32  # channels of the first block; doubled by each of the three stages
    dim: int = 128
    temperature: float = 0.1
    batch: int = 64  # source images per step; each is augmented twice
    steps: int | None = None  # None: as many as fit in max_seconds (recorded after training)
    max_seconds: float = 60.0
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patient_pairs: float = 0.5  # share of the batch drawn as same-patient pairs, given keys
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution < 16 or self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 >= 16, got {self.resolution}")
        if self.work_size < 16 or self.work_size % 8:
            raise ValueError(f"work_size must be a multiple of 8 >= 16, got {self.work_size}")
        for name in ("width", "dim", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch < 2:
            raise ValueError("batch must be >= 2 (negatives come from the batch)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or None, got {self.steps}")
        if not 0.0 <= self.patient_pairs <= 1.0:
            raise ValueError("patient_pairs must be in [0, 1]")

    @property
    def side(self) -> int:
        """The side of the images the network sees."""
        return min(self.resolution, self.work_size)

    def serves(self, resolution: int) -> bool:
        """Whether a network trained with this config embeds films of ``resolution`` exactly
        as one trained there would: both sizes are area-downsampled to the same
        ``work_size`` (a dataset version's 128 and 256 px films both reach the network at
        64 px). A size at or below ``work_size`` reaches it undownsampled, so it keeps its
        own network."""
        return self.resolution > self.work_size and resolution > self.work_size

    def at(self, resolution: int) -> CopyDetectConfig:
        """This config for films of ``resolution`` (see :meth:`serves`)."""
        if resolution != self.resolution and not self.serves(resolution):
            raise ValueError(
                f"an embedding trained at {self.resolution} px cannot embed {resolution} px films"
            )
        return replace(self, resolution=resolution)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CopyDetectConfig:
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown CopyDetectConfig keys: {sorted(set(d) - known)}")
        if "work_size" not in d and "resolution" in d:  # stored before work_size: full size
            d = {**d, "work_size": d["resolution"]}
        return cls(**d)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the resolution, then one more 3x3 conv: (B, c_in, H, W) -> (B, c_out, H/2, W/2)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CopyDetectNet(nn.Module):
    """Compact CNN -> L2-normalised embedding, (B, 1, R, R) in [0, 1] -> (B, dim).

    Each image is first standardised (zero mean, unit variance), which makes the embedding
    blind to brightness and contrast. Stem 5x5/2, three stages of [3x3/2, 3x3] with batch norm
    and ReLU (width w, 2w, 4w, 8w), global average pooling, a linear projection.
    """

    def __init__(self, cfg: CopyDetectConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.Sequential(_block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 8 * w))
        self.head = nn.Linear(8 * w, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        h = self.stem((x - mean) / std)  # (B, w, R/2, R/2)
        h = self.stages(h)  # (B, 8w, R/16, R/16)
        z = self.head(h.mean(dim=(2, 3)))  # (B, dim)
        return F.normalize(z.float(), dim=1)


# ---------------------------------------------------------------- augmentations


def _blur_matrices(sigma: Tensor, r: int) -> Tensor:
    """(B,) sigmas -> (B, R, R) row-normalised Gaussian matrices (sigma 0 = identity)."""
    i = torch.arange(r, dtype=torch.float32)
    d2 = (i[:, None] - i[None, :]) ** 2  # (R, R)
    s = sigma.clamp_min(1e-3)[:, None, None]
    m = torch.exp(-d2[None] / (2 * s**2))  # (B, R, R)
    return m / m.sum(dim=2, keepdim=True)


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Strong copy-style edits of (B, 1, R, R) images in [0, 1], drawn from ``gen``.

    Random crop of 72-100 % of the height and, independently within 8 % of that, of the width
    (crops are rarely square), scaled back up, shift up to 4 px, horizontal flip (p
    0.5), rotation up to 8 degrees and shear up to 0.08 (p 0.7), a smooth elastic
    displacement of up to 2.5 px (p 0.3), Gaussian blur (p 0.3, sigma 0.3-1.5 px), brightness
    and contrast (p 0.8), Gaussian noise (p 0.5, sigma up to 15 grey levels), clipped to
    [0, 1]. A copy a generator or a partner could plausibly make is rotated, sheared or
    warped a little, so the embedding learns to ignore that too.
    """
    b, _, r, _ = x.shape

    def u(lo: float, hi: float, n: int = b) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    scale_y = u(0.72, 1.0)  # height of the crop / R
    scale_x = (scale_y * u(0.92, 1.08)).clamp(max=1.0)  # width of the crop / R
    jitter = 8.0 / r
    tx = (torch.rand(b, generator=gen) * 2 - 1) * (1.0 - scale_x) + (
        torch.rand(b, generator=gen) * 2 - 1
    ) * jitter
    ty = (torch.rand(b, generator=gen) * 2 - 1) * (1.0 - scale_y) + (
        torch.rand(b, generator=gen) * 2 - 1
    ) * jitter
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    turn = torch.rand(b, generator=gen) < 0.7
    angle = torch.where(turn, u(-8.0, 8.0), torch.zeros(b)) * (math.pi / 180)
    shear = torch.where(turn, u(-0.08, 0.08), torch.zeros(b))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # (crop scale and flip) @ rotation @ shear: output -> input coordinates.
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale_x * flip * cos
    theta[:, 0, 1] = scale_x * flip * (cos * shear - sin)
    theta[:, 1, 0] = scale_y * sin
    theta[:, 1, 1] = scale_y * (sin * shear + cos)
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, [b, 1, r, r], align_corners=False)  # (B, R, R, 2)
    warp = torch.rand(b, generator=gen) < 0.3
    if bool(warp.any()):
        coarse = torch.randn(b, 2, 4, 4, generator=gen)
        field = F.interpolate(coarse, size=(r, r), mode="bicubic", align_corners=False)
        peak = field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        amp = torch.where(warp, u(0.5, 2.5), torch.zeros(b))[:, None, None, None]
        grid = grid + (field / peak * amp * (2.0 / r)).permute(0, 2, 3, 1)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    sigma = torch.where(torch.rand(b, generator=gen) < 0.3, u(0.3, 1.5), torch.zeros(b))
    blur = _blur_matrices(sigma, r)  # (B, R, R)
    y = blur[:, None] @ y @ blur[:, None].transpose(-1, -2)
    bc = torch.rand(b, generator=gen) < 0.8
    gain = torch.where(bc, u(0.6, 1.4), torch.ones(b))[:, None, None, None]
    offset = torch.where(bc, u(-0.2, 0.2), torch.zeros(b))[:, None, None, None]
    y = y * gain + offset
    noise = torch.where(torch.rand(b, generator=gen) < 0.5, u(0.0, 15 / 255), torch.zeros(b))
    y = y + noise[:, None, None, None] * torch.randn(y.shape, generator=gen)
    return y.clamp(0.0, 1.0)


# ---------------------------------------------------------------- training


def _batch_indices(
    rng: np.random.Generator, n: int, size: int, partners: list[np.ndarray] | None, share: float
) -> np.ndarray:
    """``size`` distinct image indices; with ``partners``, some come as same-patient pairs."""
    size = min(size, n)
    chosen: list[int] = []
    taken: set[int] = set()
    if partners is not None:
        with_partner = np.flatnonzero([len(p) > 0 for p in partners])
        for i in rng.permutation(with_partner)[: int(share * size / 2)]:
            j = int(rng.choice(partners[i]))
            if i not in taken and j not in taken and len(chosen) + 2 <= size:
                chosen += [int(i), j]
                taken |= {int(i), j}
    for i in rng.permutation(n):
        if len(chosen) >= size:
            break
        if int(i) not in taken:
            chosen.append(int(i))
            taken.add(int(i))
    return np.array(chosen, dtype=np.int64)


def supcon_loss(z: Tensor, source: Tensor, group: Tensor, temperature: float) -> Tensor:
    """Multi-positive InfoNCE over (2B, dim) unit vectors.

    Views i != j are positives when they come from the same image (``source``) or the same
    patient (``group``, equal to ``source`` when there are no patient keys).
    """
    sim = z @ z.T / temperature  # (2B, 2B)
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    sim = sim.masked_fill(eye, -torch.inf)
    pos = ((source[:, None] == source[None, :]) | (group[:, None] == group[None, :])) & ~eye
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)  # (2B, 2B)
    per_view = -(log_prob.masked_fill(~pos, 0.0).sum(1)) / pos.sum(1)  # (2B,)
    return per_view.mean()


@dataclass
class TrainResult:
    model: CopyDetectNet
    config: CopyDetectConfig  # with ``steps`` set to the number actually run
    seconds: float
    final_loss: float


def train(
    images: np.ndarray,
    patient_keys: np.ndarray | None = None,
    config: CopyDetectConfig | None = None,
    *,
    threads: int | None = None,
) -> TrainResult:
    """Train a :class:`CopyDetectNet` on uint8 (N, R, R) images.

    With ``config.steps`` set, the run is deterministic for a seed (and thread count). With
    ``steps=None`` it runs until ``max_seconds`` (timing the first steps to plan the cosine
    schedule) and records the step count, so ``steps=result.config.steps`` repeats it exactly.
    ``patient_keys`` (N,) makes two images of one patient positives too. ``threads`` sets
    torch's thread count for the run (on a host whose cores are busy, 1 thread was 2x faster
    than 2 for these small convolutions).
    """
    with torch_threads(threads):
        return _train(images, patient_keys, config)


def _train(
    images: np.ndarray, patient_keys: np.ndarray | None, config: CopyDetectConfig | None
) -> TrainResult:
    cfg = config or CopyDetectConfig(resolution=int(images.shape[-1]))
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1:] != (cfg.resolution,) * 2:
        raise ValueError(f"images must be uint8 (N, {cfg.resolution}, {cfg.resolution})")
    if len(images) < 2:
        raise ValueError("need at least two images")
    partners = None
    if patient_keys is not None:
        keys = np.asarray(patient_keys)
        if keys.shape != (len(images),):
            raise ValueError("patient_keys must have one entry per image")
        _, group_ids = np.unique(keys, return_inverse=True)
        members: dict[int, list[int]] = {}
        for i, g in enumerate(group_ids):
            members.setdefault(int(g), []).append(i)
        partners = [
            np.array([j for j in members[int(g)] if j != i]) for i, g in enumerate(group_ids)
        ]
    else:
        group_ids = np.arange(len(images))

    data = torch.cat(
        [unit_films(images[s : s + 1024], cfg.side) for s in range(0, len(images), 1024)]
    )  # (N, 1, S, S)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = CopyDetectNet(cfg).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    planned = cfg.steps or 10_000
    start = time.perf_counter()
    step, loss_value = 0, math.nan
    model.train()
    while step < planned:
        # Cosine schedule after a 5 % linear warm-up (Loshchilov and Hutter, ICLR 2017).
        warm = max(1, planned // 20)
        if step < warm:
            frac = (step + 1) / warm
        else:
            frac = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, planned - warm)))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * frac
        idx = _batch_indices(rng, len(images), cfg.batch, partners, cfg.patient_pairs)
        x = data[torch.from_numpy(idx)]  # (B, 1, R, R)
        views = torch.cat([augment(x, gen), augment(x, gen)])  # (2B, 1, R, R)
        views = views.contiguous(memory_format=torch.channels_last)
        source = torch.from_numpy(np.concatenate([idx, idx]))
        group = torch.from_numpy(group_ids[np.concatenate([idx, idx])])
        # Update the encoder: pull views of one image (and of one patient) together, push the
        # rest of the batch away (minimise the multi-positive InfoNCE loss).
        with cpu_autocast():
            z = model(views)  # (2B, dim) fp32
        loss = supcon_loss(z, source, group, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_value = float(loss.detach())
        if cfg.steps is None:
            elapsed = time.perf_counter() - start
            if step == 5:  # plan the schedule from the measured speed
                planned = max(step + 1, int(cfg.max_seconds / (elapsed / step)))
            if elapsed >= cfg.max_seconds:
                break
    model.eval()
    done = CopyDetectConfig.from_dict({**asdict(cfg), "steps": step})
    model.cfg = done
    return TrainResult(model, done, time.perf_counter() - start, loss_value)


# ---------------------------------------------------------------- inference and storage


def embed(
    model: CopyDetectNet, images: np.ndarray, batch: int = 256, threads: int | None = None
) -> np.ndarray:
    """uint8 (N, R, R) -> float32 (N, dim) unit vectors (eval mode; bf16 autocast where it pays)."""
    r = model.cfg.resolution
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1:] != (r, r):
        raise ValueError(f"images must be uint8 (N, {r}, {r}), got {images.dtype} {images.shape}")
    was_training = model.training
    model.eval()
    out = np.empty((len(images), model.cfg.dim), dtype=np.float32)
    try:
        with (
            torch.inference_mode(),
            cpu_autocast(),
            torch_threads(threads),
        ):
            for s in range(0, len(images), batch):
                x = unit_films(images[s : s + batch], model.cfg.side)
                x = x.contiguous(memory_format=torch.channels_last)
                out[s : s + len(x)] = model(x).float().numpy()
    finally:
        model.train(was_training)
    return out


def save(path: Path, model: CopyDetectNet, extra: dict[str, Any] | None = None) -> str:
    """Write the weights and config to a safetensors file; returns its sha256 (keep it)."""
    meta = {"kind": KIND, "config": asdict(model.cfg), **(extra or {})}
    return save_state(Path(path), model.state_dict(), meta)


def load(path: Path, expected_sha256: str, resolution: int | None = None) -> CopyDetectNet:
    """Rebuild a model saved by :func:`save`, for films of ``resolution`` (default: those it
    was trained on; another only where :meth:`CopyDetectConfig.serves` it); raises
    ChecksumMismatch if the file changed."""
    tensors, meta = load_state(Path(path), expected_sha256=expected_sha256)
    if meta.get("kind") != KIND:
        raise ValueError(f"{path} is not a copy-detection checkpoint (kind {meta.get('kind')!r})")
    cfg = CopyDetectConfig.from_dict(meta["config"])
    model = CopyDetectNet(cfg if resolution is None else cfg.at(resolution))
    model.load_state_dict(tensors)
    model.eval()
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
