"""Generator quality metrics that work offline, in feature spaces learned on site.

No weights are downloaded. Two small CNN encoders are trained on the real training split
(never on held-out patients, whose images are the floor): one supervised on the dataset's
own labels (:func:`train_encoder`), one self-supervised, contrastively, without labels
(:func:`train_ssl_encoder`; SimCLR, Chen et al., ICML 2020). Neither is any part of a
generator. Their penultimate features (D = ``feat_dim``) replace Inception's in:

- FID, the Frechet distance between Gaussians fitted to real and generated features
  (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule ...");
- KID, the unbiased squared MMD with the cubic polynomial kernel, averaged over random
  subsets (Binkowski et al. 2018, "Demystifying MMD GANs");
- precision and recall of k-nearest-neighbour manifolds (Kynkaanniemi et al. 2019,
  "Improved Precision and Recall Metric for Assessing Generative Models").

A number in such a space means little alone, so :func:`evaluate` also reports the floor:
the same metric between real held-out patients and the real training patients, with as many
held-out images as generated ones (FID and KID depend on the sample size). The supervised
encoder is also a classifier: its accuracy on the generated images by the class they were
asked for is their class consistency, beside its accuracy on the held-out images.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from synthray.models.checkpoint import load_state, save_state
from synthray.models.runtime import cpu_autocast

KIND = "quality-encoder"
SSL_PROJECTION = 64  # output size of the self-supervised encoder's projection head


@dataclass
class EncoderConfig:
    resolution: int = 64
    num_classes: int = 2
    width: int = 32
    feat_dim: int = 128

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Encoder(nn.Module):
    """Conv blocks (stride 2) -> global average pool -> features -> class logits."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        layers: list[nn.Module] = []
        ch_in, ch = 1, w
        size = cfg.resolution
        while size > 4:
            layers += [
                nn.Conv2d(ch_in, ch, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch),
                nn.SiLU(inplace=True),
                nn.Conv2d(ch, ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(ch),
                nn.SiLU(inplace=True),
            ]
            ch_in, ch, size = ch, min(ch * 2, 8 * w), size // 2
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(ch_in, cfg.feat_dim)
        self.head = nn.Linear(cfg.feat_dim, cfg.num_classes)

    def features(self, x: Tensor) -> Tensor:
        h = self.body(x)  # (B, C, 4, 4)
        return self.proj(h.mean(dim=(2, 3)))  # (B, feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.silu(self.features(x)))  # (B, num_classes)


def _to_input(images: np.ndarray) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float()  # (B, 1, R, R)
    return x.div_(127.5).sub_(1.0)


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Small shifts and brightness/contrast changes: labels do not depend on them."""
    b = x.shape[0]
    dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    scale = 1.0 + 0.2 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    shift = 0.2 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    return (x * scale + shift).clamp_(-1.0, 1.0)


def _views(x: Tensor, gen: torch.Generator) -> Tensor:
    """A random view of each image in (B, 1, R, R): a crop of 70-100 % of the side (aspect
    within 10 %), shifted anywhere it fits, scaled back, and brightness/contrast within 20 %.
    No flip (anatomy is not symmetric), no blur or noise: the features must stay sensitive
    to sharpness and texture, which is what generators get wrong."""
    b, _, r, _ = x.shape
    scale = 0.7 + 0.3 * torch.rand(b, generator=gen)
    aspect = 1.0 + 0.1 * (2 * torch.rand(b, generator=gen) - 1)
    sx, sy = (scale * aspect).clamp(max=1.0), (scale / aspect).clamp(max=1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    theta[:, 0, 2] = (2 * torch.rand(b, generator=gen) - 1) * (1 - sx)
    theta[:, 1, 2] = (2 * torch.rand(b, generator=gen) - 1) * (1 - sy)
    grid = F.affine_grid(theta, [b, 1, r, r], align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = 1.0 + 0.2 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
    offset = 0.2 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
    return (y * gain + offset).clamp_(-1.0, 1.0)


def nt_xent(z: Tensor, temperature: float) -> Tensor:
    """NT-Xent over (2B, d) unit vectors whose rows i and i + B are views of one image."""
    n = z.shape[0]
    sim = (z @ z.T / temperature).masked_fill(torch.eye(n, dtype=torch.bool), -torch.inf)
    partner = torch.arange(n).roll(n // 2)  # (2B,) the index of each row's other view
    return F.cross_entropy(sim, partner)


@dataclass
class TrainedEncoder:
    """An encoder and how much of its planned training it got: the time budget ends it
    early on a slow or busy CPU, and an encoder trained for fewer steps measures FID,
    precision and recall in a weaker space (figures not comparable with a fully trained
    one's)."""

    model: Encoder
    steps: int
    planned_steps: int
    seconds: float

    @property
    def cut_short(self) -> bool:
        return self.steps < self.planned_steps

    def record(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "planned_steps": self.planned_steps,
            "seconds": round(self.seconds, 1),
        }


def train_ssl_encoder(
    images: np.ndarray,
    cfg: EncoderConfig,
    *,
    max_seconds: float = 120.0,
    max_steps: int = 600,
    batch_size: int = 32,
    temperature: float = 0.2,
    seed: int = 0,
) -> TrainedEncoder:
    """Contrastive training without labels: two views per image (:func:`_views`), NT-Xent
    on the head's output (``cfg.num_classes`` is the projection's size), so that views of
    one image map close together and other images apart. The features before the head are
    the representation (Chen et al. 2020 discard the projection the same way)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # the initial weights: the seed names the whole trajectory
    model = Encoder(cfg).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    b = min(batch_size, len(images))
    start = time.monotonic()
    model.train()
    steps = 0
    while steps < max_steps and time.monotonic() - start <= max_seconds:
        steps += 1
        idx = rng.choice(len(images), size=b, replace=False)
        x = _to_input(images[idx])
        views = torch.cat([_views(x, gen), _views(x, gen)])  # (2B, 1, R, R)
        out = model(views.contiguous(memory_format=torch.channels_last))
        # Minimise NT-Xent: each view must pick its partner out of the 2B - 1 others.
        loss = nt_xent(F.normalize(out, dim=1), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return TrainedEncoder(model, steps, max_steps, time.monotonic() - start)


def train_encoder(
    images: np.ndarray,
    labels: np.ndarray,
    cfg: EncoderConfig,
    *,
    max_seconds: float = 120.0,
    max_steps: int = 600,
    batch_size: int = 64,
    seed: int = 0,
) -> TrainedEncoder:
    """Class-balanced supervised training, deterministic steps, in fp32 (see
    :func:`train_space`)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    # torch's Module.to overloads omit the documented memory_format keyword.
    model = Encoder(cfg).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    by_class = [np.flatnonzero(labels == c) for c in range(cfg.num_classes)]
    present = [c for c in range(cfg.num_classes) if len(by_class[c])]
    start = time.monotonic()
    model.train()
    steps = 0
    while steps < max_steps and time.monotonic() - start <= max_seconds:
        steps += 1
        cls = rng.choice(present, size=batch_size)
        idx = np.array([by_class[c][rng.integers(len(by_class[c]))] for c in cls])
        x = _augment(_to_input(images[idx]), gen).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(cls.astype(np.int64))
        logits = model(x)
        loss = F.cross_entropy(logits, y)  # maximise log p(label | image)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return TrainedEncoder(model, steps, max_steps, time.monotonic() - start)


SPACES = ("supervised", "self_supervised")


def train_space(
    space: str,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    max_steps: int,
    max_seconds: float,
    seed: int = 0,
) -> TrainedEncoder:
    """The encoder of a quality space (:data:`SPACES`) for images of one resolution:
    ``supervised`` learns the ``num_classes`` labels, ``self_supervised`` ignores them.

    Always in fp32, on every machine, although bf16 would be two to three times faster
    where the CPU has bf16 units: the encoder is the ruler every FID of a dataset version
    is read with, and at 300 steps its training trajectory is part of the ruler. The same
    1,338 synthetic images at 128 px stood 3.2x from the floor in a supervised encoder
    trained in bf16 and 13.3x in one trained in fp32, with the same data, steps and seed
    (docs/measurements.md, "Precision at the same steps"); one precision everywhere keeps
    deployments on different CPUs comparable."""
    resolution = int(images.shape[-1])
    if space == "supervised":
        cfg = EncoderConfig(resolution=resolution, num_classes=num_classes)
        return train_encoder(
            images, labels, cfg, max_steps=max_steps, max_seconds=max_seconds, seed=seed
        )
    if space == "self_supervised":
        cfg = EncoderConfig(resolution=resolution, num_classes=SSL_PROJECTION)
        return train_ssl_encoder(
            images, cfg, max_steps=max_steps, max_seconds=max_seconds, seed=seed
        )
    raise ValueError(f"unknown quality space {space!r}")


@torch.inference_mode()
def features(model: Encoder, images: np.ndarray, batch: int = 512) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = _to_input(images[i : i + batch]).contiguous(memory_format=torch.channels_last)
        out.append(model.features(x).float().numpy())
    return np.concatenate(out).astype(np.float64)  # (N, D)


@torch.inference_mode()
def accuracy(model: Encoder, images: np.ndarray, labels: np.ndarray) -> float:
    x = _to_input(images).contiguous(memory_format=torch.channels_last)
    return float((model(x).argmax(1).numpy() == labels).mean())


def save_encoder(path: Path, model: Encoder, extra: dict[str, Any] | None = None) -> str:
    meta = {"kind": KIND, "config": model.cfg.to_dict(), **(extra or {})}
    return save_state(path, model.state_dict(), meta)


def load_encoder(path: Path, expected_sha256: str) -> Encoder:
    tensors, meta = load_state(path, expected_sha256=expected_sha256)
    if meta.get("kind") != KIND:
        raise ValueError("not a quality encoder file")
    model = Encoder(EncoderConfig(**meta["config"]))
    model.load_state_dict(tensors)
    return model.eval()


# --------------------------------------------------------------------------- metrics


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)); the trace of the matrix
    square root is the sum of square roots of the eigenvalues of S_a S_b."""
    return _fid(a.mean(0), np.cov(a, rowvar=False), b)


def _fid(mu_a: np.ndarray, s_a: np.ndarray, b: np.ndarray) -> float:
    """:func:`fid` against a set already reduced to its mean and covariance."""
    mu_b, s_b = b.mean(0), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s_a @ s_b)
    tr_sqrt = float(np.sqrt(np.clip(eig.real, 0.0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_sqrt)


def kid(
    a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 500, seed: int = 0
) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over random subsets."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        return math.nan
    d = a.shape[1]
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals.append(
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return float(np.mean(vals))


# Rows of a distance matrix computed at once: every training film can be the reference
# (tens of thousands), and a full N x N matrix of them would not fit in memory.
DISTANCE_ROWS = 1024


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) Euclidean distances via |a|^2 + |b|^2 - 2 a.b (no (N, M, D) temporary)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(sq, 0.0))


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Each point's distance to its k-th nearest other point, DISTANCE_ROWS rows at a time."""
    kth = min(k, len(x) - 1)  # index 0 is the point itself
    out = np.empty(len(x))
    for i in range(0, len(x), DISTANCE_ROWS):
        d = _distances(x[i : i + DISTANCE_ROWS], x)
        rows = np.arange(len(d))
        d[rows, rows + i] = 0.0  # the point itself, exactly
        out[i : i + len(d)] = np.partition(d, kth, axis=1)[:, kth]
    return out


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    inside = [
        (_distances(points[i : i + DISTANCE_ROWS], centres) <= radii[None, :]).any(axis=1)
        for i in range(0, len(points), DISTANCE_ROWS)
    ]
    return float(np.concatenate(inside).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Precision: share of generated samples inside the real manifold (union of k-NN
    balls of real samples); recall: share of real samples inside the generated one."""
    if len(real) <= k or len(fake) <= k:
        return math.nan, math.nan
    return _precision_recall(real, _kth_radius(real, k), fake, k)


def _precision_recall(
    real: np.ndarray, radii: np.ndarray, fake: np.ndarray, k: int
) -> tuple[float, float]:
    """:func:`precision_recall` with the real set's k-NN radii already computed."""
    return _covered(fake, real, radii), _covered(real, fake, _kth_radius(fake, k))


class _Reference:
    """A set of real features that many sets are compared with: its mean, covariance and
    k-NN radii are computed once."""

    def __init__(self, f: np.ndarray, k: int = 3) -> None:
        self.f, self.k = f, k
        self.mu, self.cov = f.mean(0), np.cov(f, rowvar=False)
        self.radii = _kth_radius(f, k) if len(f) > k else None

    def precision_recall(self, other: np.ndarray) -> tuple[float, float]:
        if self.radii is None or len(other) <= self.k:
            return math.nan, math.nan
        return _precision_recall(self.f, self.radii, other, self.k)

    def metrics(self, other: np.ndarray) -> dict[str, float]:
        p, r = self.precision_recall(other)
        return {
            "fid": _fid(self.mu, self.cov, other),
            "kid": kid(self.f, other),
            "precision": p,
            "recall": r,
        }


def _spread(values: list[float]) -> tuple[float, list[float]]:
    """The median of ``values`` and their [lowest, highest], NaNs left out (all NaN where
    every one is)."""
    v = np.array(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, [math.nan, math.nan]
    return float(np.median(v)), [float(v.min()), float(v.max())]


def _median(figures: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's median over the comparisons."""
    return {key: _spread([f[key] for f in figures])[0] for key in figures[0]}


def _span(figures: list[dict[str, float]]) -> dict[str, list[float]]:
    """Each metric's [lowest, highest] over the comparisons."""
    return {key: _spread([f[key] for f in figures])[1] for key in figures[0]}


def class_shares(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) share of each class among ``labels``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return counts / max(int(counts.sum()), 1)


def mix_capacity(labels: np.ndarray, shares: np.ndarray) -> int:
    """The most images a subsample of ``labels`` can hold in the class proportions
    ``shares`` (renormalised over the classes ``labels`` has)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(shares))
    have = (shares > 0) & (counts > 0)
    if not have.any():
        return 0
    p = shares[have] / shares[have].sum()
    return int(np.floor(np.min(counts[have] / p) + 1e-9))


def matched_subsample(
    labels: np.ndarray, shares: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted indices of ``n`` images of ``labels`` (n at most :func:`mix_capacity`) whose
    classes come in the proportions ``shares``: the largest remainders round the per-class
    counts, and each class's images are a random choice among its own."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=len(shares))
    have = (shares > 0) & (counts > 0)
    if n <= 0 or not have.any():
        return np.zeros(0, np.int64)
    p = np.where(have, shares, 0.0)
    p = p / p.sum()
    exact = p * n
    take = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: n - int(take.sum())]] += 1
    take = np.minimum(take, counts)  # rounding up can ask one more than a class holds
    picks = [
        rng.choice(np.flatnonzero(labels == c), int(k), replace=False)
        for c, k in enumerate(take)
        if k > 0
    ]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


# Fewest images a mix-matched comparison may hold (a covariance needs several); below it the
# sets are compared as drawn, and ``class_mix["compared"]`` is the generated set's own mix.
MIN_COMPARED = 10
# Comparisons on different subsamples of the held-out and generated images. With a random
# 2,000 training films as the reference, one 128 px generated set's FID moved +-5% with the
# subsample and the floor threefold (0.34-1.00). With every training film as the
# reference the floor still moves with the held-out subsample (Kermany, 128 px: 5-95% of
# subsamples of 626 of 930 held-out films gave 0.47-1.14), so the figures are medians over
# SUBSAMPLES comparisons, beside their range. Features are computed once; each further
# comparison costs about 4 s at 128 px on 2 cores, against about 60 s for the features.
SUBSAMPLES = 9


def evaluate(
    spaces: Mapping[str, Encoder],
    classifier: Encoder,
    train: np.ndarray,
    train_labels: np.ndarray,
    holdout: np.ndarray,
    holdout_labels: np.ndarray,
    fake: np.ndarray,
    fake_labels: np.ndarray,
    class_names: list[str],
    max_reference: int = 20_000,
    max_compared: int = 2000,
    subsamples: int = SUBSAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of generated vs real-train features in every space of ``spaces``, overall and
    per class, each beside its floor (real held-out vs real train, with as many held-out
    images as generated ones), and the class consistency of the generated images under
    ``classifier`` beside its accuracy on the held-out images.

    The reference is every training image (a random ``max_reference`` of them beyond
    that). The generated and the held-out images are compared ``subsamples`` times, each
    time on a new subsample of at most ``max_compared`` of each; every figure is the median
    over those comparisons, and ``spread`` gives the overall figures' range and the ratio of
    generated to floor FID (median and range, paired by comparison).

    The overall figures compare like with like: the generated and the held-out images are
    both subsampled in the training images' class proportions (over the classes both
    hold, the reference cut to those too), since a set drawn in other proportions (a
    balanced pool against an unbalanced site) lies away from the training features by its
    mix alone, whatever its images look like. Where the generated images
    were drawn in another mix, ``as_drawn`` keeps the figures of a plain random subsample
    of them as well, and ``class_mix`` states both mixes."""
    rng = np.random.default_rng(seed)
    n_classes = len(class_names)
    drawn = class_shares(fake_labels, n_classes)
    if len(train) > max_reference:
        keep = np.sort(rng.choice(len(train), max_reference, replace=False))
        train, train_labels = train[keep], train_labels[keep]
    reference = class_shares(train_labels, n_classes)
    # One mix for all three sets: the training images' proportions among the classes that
    # the held-out and the generated sets both hold (a class without held-out films has no
    # floor to compare with; its training images leave the reference too).
    both = (np.bincount(holdout_labels, minlength=n_classes) > 0) & (
        np.bincount(fake_labels, minlength=n_classes) > 0
    )
    shares = np.where(both, reference, 0.0)
    shares = shares / max(float(shares.sum()), 1e-12)
    m = min(mix_capacity(holdout_labels, shares), mix_capacity(fake_labels, shares), max_compared)
    matched = m >= MIN_COMPARED
    if not matched:  # too few held-out images to match the mix at all: compare as drawn
        m = min(len(holdout), len(fake), max_compared)
        both[:] = True
        shares = drawn
    # A generated set drawn in the training mix already (to a point of rounding) needs
    # no second figure.
    off_mix = float(np.abs(drawn - shares).max()) > 0.01

    def pick(labels: np.ndarray) -> np.ndarray:
        if matched:
            return matched_subsample(labels, shares, m, rng)
        return np.sort(rng.choice(len(labels), m, replace=False))

    # Which images each comparison holds, the same in every space.
    draws = [
        (pick(holdout_labels), pick(fake_labels), np.sort(rng.choice(len(fake), m, replace=False)))
        for _ in range(max(1, subsamples))
    ]
    out: dict[str, Any] = {
        "spaces": {},
        "reference_images": len(train),
        "compared_images": m,
        "subsamples": len(draws),
        "class_mix": {
            "reference": dict(zip(class_names, reference.tolist(), strict=True)),
            "compared": dict(zip(class_names, shares.tolist(), strict=True)),
            "generated_as_drawn": dict(zip(class_names, drawn.tolist(), strict=True)),
        },
    }
    for name, model in spaces.items():
        f_train, f_hold, f_fake = (features(model, x) for x in (train, holdout, fake))
        ref = _Reference(f_train[both[train_labels]])  # the compared classes' training films
        ref_all = _Reference(f_train) if off_mix else ref
        per_ref = {
            c: _Reference(f_train[train_labels == c])
            for c in range(n_classes)
            if (train_labels == c).sum() >= 5
        }
        gen, flo, as_drawn = [], [], []
        per_class: dict[str, dict[str, list[dict[str, float]]]] = {}
        for keep_h, keep_f, keep_d in draws:
            gen.append(ref.metrics(f_fake[keep_f]))
            flo.append(ref.metrics(f_hold[keep_h]))
            if off_mix:
                as_drawn.append(ref_all.metrics(f_fake[keep_d]))
            for c, cname in enumerate(class_names):
                ho = f_hold[keep_h][holdout_labels[keep_h] == c]
                fa = f_fake[keep_f][fake_labels[keep_f] == c]
                n_c = min(len(ho), len(fa))
                if c not in per_ref or n_c < 5:
                    continue
                sides = per_class.setdefault(cname, {"generated": [], "floor": []})
                sides["generated"].append(per_ref[c].metrics(fa[:n_c]))
                sides["floor"].append(per_ref[c].metrics(ho[:n_c]))
        ratio, ratio_range = _spread(
            [
                g["fid"] / f["fid"] if f["fid"] > 0 else math.nan
                for g, f in zip(gen, flo, strict=True)
            ]
        )
        space: dict[str, Any] = {
            "overall": {"generated": _median(gen), "floor": _median(flo)},
            "spread": {
                "generated": _span(gen),
                "floor": _span(flo),
                "fid_ratio": {"median": ratio, "range": ratio_range},
            },
            "per_class": {
                cname: {side: _median(figs) for side, figs in sides.items()}
                for cname, sides in per_class.items()
            },
        }
        if off_mix:
            space["as_drawn"] = {"generated": _median(as_drawn), "images": m}
        out["spaces"][name] = space
    out["class_consistency"] = _consistency(
        classifier, holdout, holdout_labels, fake, fake_labels, class_names
    )
    return _rounded(out)


@torch.inference_mode()
def probabilities(model: Encoder, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """(N, classes) float32 softmax of the encoder's class head."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = _to_input(images[i : i + batch]).contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().softmax(1).numpy())
    n_cls = model.cfg.num_classes
    return np.concatenate(out) if out else np.zeros((0, n_cls), dtype=np.float32)


# Image positions per batch when scoring for a choice: 32 images at 128 px, 128 at 64 px.
# At 128 px on a Xeon with AMX, 512 per batch scored 3.9-4.2 ms per image in fp32 and
# 1.7-1.9 in bf16, 32 per batch 3.1-3.3 and 0.8-1.3: a batch's activations then stay in
# cache (the sampler sizes its batches the same way).
CHOICE_POSITIONS = 2**19


def choice_batch(resolution: int) -> int:
    """Images per batch for :func:`probabilities_for_choice` at ``resolution``."""
    return max(8, min(512, CHOICE_POSITIONS // (resolution * resolution)))


def probabilities_for_choice(model: Encoder, images: np.ndarray) -> np.ndarray:
    """:func:`probabilities` for ranking images, not for reporting a figure: in bf16 where
    the CPU has bf16 units (:func:`~synthray.models.runtime.cpu_autocast`; a probability
    moves by about 1e-4, 2.2-2.6x faster at 64-256 px) and in cache-sized batches. The
    quality figures (class consistency) keep fp32."""
    with cpu_autocast():
        return probabilities(model, images, choice_batch(int(images.shape[-1])))


def predict(model: Encoder, images: np.ndarray, batch: int = 512) -> np.ndarray:
    return probabilities(model, images, batch).argmax(1)


def _consistency(
    classifier: Encoder,
    holdout: np.ndarray,
    holdout_labels: np.ndarray,
    fake: np.ndarray,
    fake_labels: np.ndarray,
    class_names: list[str],
) -> dict[str, Any]:
    """Balanced accuracy of the real-trained classifier on generated images by the class
    they were asked for, and its recall per class, beside the same on real held-out images
    (the floor: what the classifier makes of real radiographs of unseen patients)."""
    pred = {"generated": predict(classifier, fake), "floor": predict(classifier, holdout)}
    truth = {"generated": fake_labels, "floor": holdout_labels}
    per_class: dict[str, dict[str, float]] = {}
    for c, name in enumerate(class_names):
        per_class[name] = {}
        for side in ("generated", "floor"):
            mask = truth[side] == c
            per_class[name][side] = (
                float((pred[side][mask] == c).mean()) if mask.any() else math.nan
            )
    out: dict[str, Any] = {}
    for side in ("generated", "floor"):
        recalls = [per_class[n][side] for n in class_names if not math.isnan(per_class[n][side])]
        out[side] = float(np.mean(recalls)) if recalls else math.nan
    return out | {"per_class": per_class}


def _rounded(x: Any) -> Any:
    """Floats to 6 significant digits (a weak encoder's FIDs and most KIDs are under 1e-4,
    so a fixed number of decimals would store them as 0), NaN as None."""
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    if isinstance(x, float):
        return None if math.isnan(x) else float(f"{x:.6g}")
    return x
