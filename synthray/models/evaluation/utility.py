"""Downstream utility of synthetic images: does a classifier trained with them do better
on real radiographs of unseen patients than one trained without them?

The protocol is Salehinejad et al. (ICASSP 2018; IEEE TMI 2019, "Generalization of deep
neural networks for chest pathology classification in X-rays using GANs"): train the same
classifier on the real unbalanced set (DS1), on the real set balanced with synthetic
images (DS2) and on the real set undersampled to its smallest class (DS3), and score each
on real test images. It is extended with the baselines a fair comparison needs today:

- ``TSTR``: train on synthetic images only (as many as DS1 holds, balanced), test on real;
- ``AUG`` and ``DS2+AUG``: classic augmentation (small affine, brightness and contrast;
  no horizontal flip, since radiographs are not left-right symmetric), which DS2 must
  beat to be worth a generator;
- ``DS2-even``: as many synthetic images as DS2 adds, spread over the classes in their
  real proportions, so that being synthetic predicts no class: it separates "more
  images" from "rebalanced classes";
- ``PRE``: pre-train on the TSTR set, then fine-tune every weight on DS1, as RoentGen-v2
  does ("Improving Performance, Robustness, and Fairness of Radiographic AI Models with
  Finely-Controllable Synthetic Data", arXiv:2508.16783, 2025); each phase has the
  full step budget, so PRE trains twice as many steps as the other arms.

Every arm trains a fresh :class:`SmallResNet` (He et al. 2016, "Deep Residual Learning
for Image Recognition") for the same number of AdamW steps from the same initial
weights and batch randomness (both seeded with the seed, through ``torch.Generator``
only), so that arms differ only in their training images. Batches are drawn uniformly
from an arm's images unless ``balanced_batches``: the class mix of an arm is what is
being tested. Synthetic images are drawn from the caller's pool as one random order per
class and seed, and every arm takes a prefix of that order, so arms that need the same
number of images of a class get the same images; :func:`pool_needs` says how many.

Who computes what: scikit-learn (``sklearn.metrics``) computes accuracy, balanced
accuracy, per-class recall and the one-vs-rest macro ROC AUC on the test images; scipy
(``scipy.stats.t``) gives the 95% Student t-intervals over seeds, for each arm's means
and for the paired per-seed differences from DS1; matplotlib (Agg, no display) draws
the chart. The networks and their training are plain PyTorch. On CPU the networks run
in bf16 autocast only where :func:`~synthray.models.runtime.cpu_bf16_fast`, else fp32.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from scipy import stats
from sklearn import metrics
from torch import Tensor, nn

from synthray.models.runtime import cpu_autocast, resolve_device, to_channels_last

# With n_c the real training images of class c and N = sum(n_c):
# DS1       the real images as they are (unbalanced).
# DS2       real + synthetic, every class filled up to max(n_c).
# DS3       real, each class undersampled (random, without replacement) to min(n_c).
# TSTR      synthetic only: N images, N // C per class (the remainder to the first classes).
# AUG       DS1 with classic augmentation (see augment_batch).
# DS2+AUG   DS2, the same synthetic images, with the same augmentation.
# DS2-even  real + round(r * n_c) synthetic per class (Python's round, half to even), with
#           r = (synthetic images DS2 adds) / N: being synthetic predicts no class.
# PRE       pre-train on the TSTR set (the same images), then fine-tune all weights on DS1.
ARMS = ("DS1", "DS2", "DS3", "TSTR", "AUG", "DS2+AUG", "DS2-even", "PRE")
METRICS = ("accuracy", "balanced_accuracy", "macro_auroc")
RESOLUTIONS = (64, 128, 256)


class Cancelled(Exception):
    """Raised by :func:`evaluate_utility` when ``should_stop()`` says so between arms."""


@dataclass
class ClassifierConfig:
    steps: int = 300  # optimizer steps per training phase, identical for every arm
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak; short linear warm-up, then cosine decay to 0
    weight_decay: float = 1e-4
    width: int = 16  # channels of the first stage of the SmallResNet
    balanced_batches: bool = False  # False: uniform over the arm's images

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.width < 1:
            raise ValueError("steps, batch_size and width must be at least 1")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError("lr must be positive and weight_decay non-negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown classifier settings: {', '.join(unknown)}")
        return cls(**data)


# --------------------------------------------------------------------------- network


class BasicBlock(nn.Module):
    """conv3x3 (stride s) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU.

    The shortcut is the identity, or where the shape changes the ResNet-D projection
    (He et al. 2019, "Bag of Tricks for Image Classification with CNNs"): 2x2 average
    pool, then a stride-1 1x1 conv + BN. It sees every input pixel, unlike a strided 1x1
    conv, and it keeps clear of oneDNN's strided 1x1 channels-last weight-gradient kernel,
    which writes past its workspace when the input has fewer channels than its SIMD block
    (uxlfoundation/oneDNN#6035: heap corruption, hangs or wrong gradients; seen here with
    torch 2.13 on an AVX2 CPU at 2-7 input channels).
    """

    def __init__(self, ch_in: int, ch_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch_out)
        self.conv2 = nn.Conv2d(ch_out, ch_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or ch_in != ch_out:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride) if stride != 1 else nn.Identity(),
                nn.Conv2d(ch_in, ch_out, 1, bias=False),
                nn.BatchNorm2d(ch_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, C_out, H/s, W/s)
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x), inplace=True)


class SmallResNet(nn.Module):
    """A ResNet (He et al. 2016) sized for a few thousand small radiographs.

    (B, 1, R, R) in [-1, 1] -> stem: conv3x3 stride 2 + BN + ReLU + maxpool 3x3 stride 2
    -> (B, w, R/4, R/4) -> four stages of one basic block each, widths w, 2w, 4w, 8w, the
    last three downsampling by 2 -> (B, 8w, R/32, R/32) -> global average pool -> linear
    -> (B, num_classes) logits. About 300k parameters at w = 16.

    Weights are drawn from ``generator`` (default: seeded with 0): Kaiming-normal
    convolutions, and a zero-initialised last BN scale in every residual branch as in
    Goyal et al. 2017. The layers are built on the meta device first, so building a
    network never draws from (or advances) torch's global RNG.
    """

    def __init__(
        self,
        num_classes: int,
        resolution: int = 64,
        width: int = 16,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, not {resolution}")
        if num_classes < 2:
            raise ValueError("a classifier needs at least 2 classes")
        w = width
        self.num_classes, self.resolution, self.width = num_classes, resolution, width
        with torch.device("meta"):  # shapes only: the default initialisers draw nothing
            self._build(num_classes, w)
        self.to_empty(device="cpu")
        self.reset_parameters(generator or torch.Generator().manual_seed(0))

    def _build(self, num_classes: int, w: int) -> None:
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        chans = [w, 2 * w, 4 * w, 8 * w]
        self.stages = nn.Sequential(
            *(
                BasicBlock(chans[max(i - 1, 0)], chans[i], stride=1 if i == 0 else 2)
                for i in range(len(chans))
            )
        )
        self.head = nn.Linear(chans[-1], num_classes)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(
                    m.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()  # scale 1, shift 0, running statistics reset
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01, generator=generator)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # each block starts as the identity

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)  # (B, w, R/4, R/4)
        h = self.stages(h)  # (B, 8w, R/32, R/32)
        return self.head(h.mean(dim=(2, 3)))  # (B, num_classes)


# --------------------------------------------------------------------------- arms


@dataclass
class ArmSet:
    """What one arm trains on (real images first, then synthetic)."""

    images: np.ndarray  # uint8 (N, R, R)
    labels: np.ndarray  # int64 (N,)
    synthetic: np.ndarray  # bool (N,)
    augment: bool
    pretrain: tuple[np.ndarray, np.ndarray] | None  # (images, labels) for PRE

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)


def _synthetic_needs(real_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Synthetic images per class (C,) that each arm takes from the pool."""
    n = np.asarray(real_counts, dtype=np.int64)
    if n.ndim != 1 or len(n) < 2:
        raise ValueError("real_counts must hold one count per class, for at least 2 classes")
    empty = np.flatnonzero(n <= 0)
    if len(empty):
        raise ValueError(f"class {int(empty[0])} has no real training image")
    total, c = int(n.sum()), len(n)
    fill = n.max() - n  # DS2: up to the largest real class
    r = float(fill.sum()) / total  # DS2-even: the same share added to every class
    even = np.array([round(r * int(k)) for k in n], dtype=np.int64)
    tstr = np.full(c, total // c, dtype=np.int64)
    tstr[: total % c] += 1  # the remainder, one image each, to the first classes
    zero = np.zeros(c, dtype=np.int64)
    return {
        "DS1": zero,
        "DS2": fill,
        "DS3": zero,
        "TSTR": tstr,
        "AUG": zero,
        "DS2+AUG": fill,
        "DS2-even": even,
        "PRE": tstr,
    }


def _check_arms(arms: Sequence[str]) -> list[str]:
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    if not arms:
        raise ValueError("no arm requested")
    return list(dict.fromkeys(arms))


def pool_needs(real_counts: np.ndarray, arms: Sequence[str] = ARMS) -> np.ndarray:
    """(C,) synthetic images per class that :func:`build_arms` needs at most over ``arms``
    (the arms share one random order per class, so the need is a maximum, not a sum)."""
    needs = _synthetic_needs(real_counts)
    return np.max(np.stack([needs[a] for a in _check_arms(arms)]), axis=0)


def build_arms(
    real_x: np.ndarray,
    real_y: np.ndarray,
    syn_x: np.ndarray,
    syn_y: np.ndarray,
    num_classes: int,
    rng: np.random.Generator,
    arms: Sequence[str] = ARMS,
) -> dict[str, ArmSet]:
    """The training set of every arm in ``arms`` (see the module docstring).

    ``rng`` is consumed in a fixed order whatever ``arms`` holds (one permutation of the
    synthetic pool per class, then DS3's undersampling), so one arm's images do not
    depend on which other arms were asked for.
    """
    arms = _check_arms(arms)
    real_y = np.asarray(real_y, dtype=np.int64)
    syn_y = np.asarray(syn_y, dtype=np.int64)
    if len(real_x) != len(real_y) or len(syn_x) != len(syn_y):
        raise ValueError("images and labels differ in length")
    for name, y in (("real", real_y), ("synthetic", syn_y)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes})")
    if len(syn_x) == 0:
        syn_x = np.empty((0, *real_x.shape[1:]), dtype=real_x.dtype)
    real_counts = np.bincount(real_y, minlength=num_classes)
    needs = _synthetic_needs(real_counts)
    syn_counts = np.bincount(syn_y, minlength=num_classes)
    for arm in arms:
        for c in range(num_classes):
            if needs[arm][c] > syn_counts[c]:
                raise ValueError(
                    f"arm {arm} needs {int(needs[arm][c])} synthetic images of class {c}, "
                    f"the pool holds {int(syn_counts[c])}"
                )

    syn_order = [rng.permutation(np.flatnonzero(syn_y == c)) for c in range(num_classes)]
    n_min = int(real_counts.min())
    under = np.concatenate(
        [
            np.sort(rng.choice(np.flatnonzero(real_y == c), n_min, replace=False))
            for c in range(num_classes)
        ]
    )
    real_all = np.arange(len(real_y))

    def arm_set(real_idx: np.ndarray, syn_need: np.ndarray, augment: bool) -> ArmSet:
        syn_idx = np.concatenate([syn_order[c][: syn_need[c]] for c in range(num_classes)]).astype(
            np.int64
        )
        return ArmSet(
            images=np.concatenate([real_x[real_idx], syn_x[syn_idx]]),
            labels=np.concatenate([real_y[real_idx], syn_y[syn_idx]]),
            synthetic=np.concatenate([np.zeros(len(real_idx), bool), np.ones(len(syn_idx), bool)]),
            augment=augment,
            pretrain=None,
        )

    out: dict[str, ArmSet] = {}
    none = np.zeros(num_classes, dtype=np.int64)
    for arm in arms:
        if arm == "PRE":  # fine-tune on DS1 after pre-training on the TSTR set
            tstr = arm_set(real_all[:0], needs["PRE"], augment=False)
            out[arm] = arm_set(real_all, none, augment=False)
            out[arm].pretrain = (tstr.images, tstr.labels)
        elif arm == "DS3":
            out[arm] = arm_set(under, needs[arm], augment=False)
        elif arm == "TSTR":
            out[arm] = arm_set(real_all[:0], needs[arm], augment=False)
        else:
            out[arm] = arm_set(real_all, needs[arm], augment=arm in ("AUG", "DS2+AUG"))
    return out


# --------------------------------------------------------------------------- training


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported())
    return cpu_autocast()


def _to_input(images: Tensor) -> Tensor:
    """uint8 (B, R, R) -> float (B, 1, R, R) in [-1, 1], channels-last."""
    x = images.unsqueeze(1).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


def augment_batch(x: Tensor, gen: torch.Generator) -> Tensor:
    """Classic augmentation of (B, 1, R, R) in [-1, 1]: a random affine per image
    (rotation +-10 degrees, scale 0.9-1.1, translation +-6% of the side; no flip) with
    edge pixels repeated outside, then contrast x0.9-1.1 about the image mean and
    brightness +-0.1. Draws its randomness from ``gen`` (a CPU generator)."""
    b = x.shape[0]
    u = torch.rand(b, 6, generator=gen).to(x.device) * 2 - 1  # (B, 6) in [-1, 1]
    angle = u[:, 0] * math.radians(10.0)
    scale = 1.0 + 0.1 * u[:, 1]
    tx, ty = 0.12 * u[:, 2], 0.12 * u[:, 3]  # affine_grid spans [-1, 1]: 6% of R is 0.12
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output -> input map
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, R, R, 2)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    mean = x.mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    contrast = (1.0 + 0.1 * u[:, 4]).view(b, 1, 1, 1)
    bright = (0.1 * u[:, 5]).view(b, 1, 1, 1)
    x = (x - mean) * contrast + mean + bright
    return x.clamp_(-1.0, 1.0).contiguous(memory_format=torch.channels_last)


class _Batches:
    """Index batches over one training set, uniform or class-balanced, from ``gen``."""

    def __init__(self, labels: np.ndarray, num_classes: int, balanced: bool) -> None:
        self.n = len(labels)
        self.balanced = balanced
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=num_classes)
        present = np.flatnonzero(counts)
        self.order = torch.from_numpy(order)
        self.present = torch.from_numpy(present)
        self.counts = torch.from_numpy(counts[present])
        self.starts = torch.from_numpy((np.cumsum(counts) - counts)[present])

    def draw(self, size: int, gen: torch.Generator) -> Tensor:
        if not self.balanced:
            return torch.randint(self.n, (size,), generator=gen)
        k = torch.randint(len(self.present), (size,), generator=gen)  # class slot per image
        pos = (torch.rand(size, generator=gen) * self.counts[k]).long()
        return self.order[self.starts[k] + pos.clamp_(max=self.counts[k] - 1)]


def _train_phase(
    model: SmallResNet,
    images: np.ndarray,
    labels: np.ndarray,
    aug: bool,
    cfg: ClassifierConfig,
    gen: torch.Generator,
    device: torch.device,
) -> None:
    """``cfg.steps`` AdamW steps of cross-entropy on (images, labels), fresh optimizer."""
    x_all = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # uint8 (N, R, R)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)  # (N,)
    batches = _Batches(np.asarray(labels), model.num_classes, cfg.balanced_batches)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 20)
    model.train()
    for step in range(cfg.steps):
        if step < warmup:
            lr = cfg.lr * (step + 1) / warmup
        else:
            lr = 0.5 * cfg.lr * (1.0 + math.cos(math.pi * (step - warmup) / (cfg.steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = batches.draw(cfg.batch_size, gen).to(device)
        x = _to_input(x_all[idx])  # (B, 1, R, R)
        if aug:
            x = augment_batch(x, gen)
        with _autocast(device):
            logits = model(x)  # (B, C)
        # Minimise cross-entropy: maximise log p(label | image).
        loss = F.cross_entropy(logits.float(), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def _precise_bn(
    model: SmallResNet,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: ClassifierConfig,
    gen: torch.Generator,
    device: torch.device,
    batches: int = 8,
) -> None:
    """Precise BatchNorm (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): replace
    the running statistics, an average over weights that kept changing (and mostly over
    the first steps when a run is short), by the plain mean over a few training batches
    (unaugmented, like the test images) under the final weights."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    x_all = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # uint8 (N, R, R)
    draw = _Batches(np.asarray(labels), model.num_classes, cfg.balanced_batches)
    model.train()
    for _ in range(batches):
        with _autocast(device):
            model(_to_input(x_all[draw.draw(cfg.batch_size, gen).to(device)]))
    for m in norms:
        m.momentum = 0.1
    model.eval()


@torch.inference_mode()
def predict_proba(
    model: SmallResNet, images: np.ndarray, device: torch.device | str = "cpu", batch: int = 256
) -> np.ndarray:
    """Class probabilities (N, C), float64, of uint8 images (N, R, R)."""
    device = torch.device(device)
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = _to_input(torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(device))
        with _autocast(device):
            logits = model(x)  # (b, C)
        out.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    return np.concatenate(out)


def train_classifier(
    arm: ArmSet,
    num_classes: int,
    cfg: ClassifierConfig,
    seed: int,
    device: torch.device | str = "cpu",
) -> SmallResNet:
    """A fresh SmallResNet trained on one arm: weights and batches from ``seed`` only.
    With a pretrain set, ``cfg.steps`` on it first, then ``cfg.steps`` on the arm."""
    device = resolve_device(str(device))
    resolution = int(arm.images.shape[-1])
    gen = torch.Generator().manual_seed(seed)  # weights, then every batch and augmentation
    model = SmallResNet(num_classes, resolution, cfg.width, generator=gen)
    model = cast(SmallResNet, to_channels_last(model.to(device)))
    if arm.pretrain is not None:
        _train_phase(model, *arm.pretrain, aug=arm.augment, cfg=cfg, gen=gen, device=device)
    _train_phase(model, arm.images, arm.labels, arm.augment, cfg, gen, device)
    _precise_bn(model, arm.images, arm.labels, cfg, gen, device)
    return model


# --------------------------------------------------------------------------- scores


@dataclass
class ArmScores:
    """One arm, one seed, scored on the real test images."""

    accuracy: float
    balanced_accuracy: float
    macro_auroc: float
    recall: list[float]  # per class
    train_images: int  # in all phases (PRE: DS1 plus its pre-training set)
    synthetic_images: int  # of train_images
    seconds: float  # training and scoring


def classification_scores(
    labels: np.ndarray, proba: np.ndarray, num_classes: int
) -> tuple[float, float, float, list[float]]:
    """(accuracy, balanced accuracy, macro one-vs-rest ROC AUC, per-class recall), all by
    sklearn.metrics. Every class must occur in ``labels``."""
    labels = np.asarray(labels, dtype=np.int64)
    classes = list(range(num_classes))
    pred = proba.argmax(axis=1)
    if num_classes == 2:  # sklearn's binary form; equals the one-vs-rest macro mean
        auroc = metrics.roc_auc_score(labels, proba[:, 1])
    else:
        auroc = metrics.roc_auc_score(
            labels, proba, multi_class="ovr", average="macro", labels=classes
        )
    recall = metrics.recall_score(labels, pred, labels=classes, average=None, zero_division=0)
    return (
        float(metrics.accuracy_score(labels, pred)),
        float(metrics.balanced_accuracy_score(labels, pred)),
        float(auroc),
        [float(r) for r in recall],
    )


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float | None]:
    """Mean and the two-sided Student t-interval of the mean (None with one value)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "low": None, "high": None}
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "low": mean - half, "high": mean + half}


@dataclass
class UtilityResult:
    classes: list[str]
    arms: list[str]
    seeds: list[int]
    config: dict[str, Any]  # ClassifierConfig.to_dict()
    scores: dict[str, list[ArmScores]]  # arm -> one per seed, in seed order
    # arm -> {metric: {"mean", "low", "high"}, "recall": [per class {"mean", "low", "high"}]}
    summary: dict[str, dict[str, Any]]
    # arm -> {metric: {"mean", "low", "high"}} of the paired per-seed difference arm - DS1
    vs_ds1: dict[str, dict[str, Any]]
    test_images: int
    test_counts: list[int]

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(
            {
                "classes": self.classes,
                "arms": self.arms,
                "seeds": self.seeds,
                "config": self.config,
                "scores": {a: [asdict(s) for s in ss] for a, ss in self.scores.items()},
                "summary": self.summary,
                "vs_ds1": self.vs_ds1,
                "test_images": self.test_images,
                "test_counts": self.test_counts,
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UtilityResult:
        return cls(
            **{
                **data,
                "scores": {a: [ArmScores(**s) for s in ss] for a, ss in data["scores"].items()},
            }
        )

    def to_csv(self) -> str:
        """One row per (arm, seed), then one ``mean`` row per arm (seed column "mean")."""
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(
            [
                "arm",
                "seed",
                *METRICS,
                *(f"recall_{c}" for c in self.classes),
                "train_images",
                "synthetic_images",
            ]
        )
        for arm in self.arms:
            for seed, s in zip(self.seeds, self.scores[arm], strict=True):
                out.writerow(
                    [
                        arm,
                        seed,
                        *(_fmt(getattr(s, m)) for m in METRICS),
                        *(_fmt(r) for r in s.recall),
                        s.train_images,
                        s.synthetic_images,
                    ]
                )
        for arm in self.arms:
            summ, ss = self.summary[arm], self.scores[arm]
            out.writerow(
                [
                    arm,
                    "mean",
                    *(_fmt(summ[m]["mean"]) for m in METRICS),
                    *(_fmt(r["mean"]) for r in summ["recall"]),
                    _fmt(float(np.mean([s.train_images for s in ss]))),
                    _fmt(float(np.mean([s.synthetic_images for s in ss]))),
                ]
            )
        return buf.getvalue()


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


def _summarise(
    scores: dict[str, list[ArmScores]], num_classes: int
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    summary: dict[str, dict[str, Any]] = {}
    for arm, ss in scores.items():
        summary[arm] = {m: t_interval([getattr(s, m) for s in ss]) for m in METRICS}
        summary[arm]["recall"] = [t_interval([s.recall[c] for s in ss]) for c in range(num_classes)]
    vs_ds1: dict[str, dict[str, Any]] = {}
    if "DS1" in scores:
        base = scores["DS1"]
        for arm, ss in scores.items():
            vs_ds1[arm] = {
                m: t_interval(
                    [getattr(s, m) - getattr(b, m) for s, b in zip(ss, base, strict=True)]
                )
                for m in METRICS
            }
    return summary, vs_ds1


def _train_images(arm: ArmSet) -> tuple[int, int]:
    """(images, synthetic images) an arm trains on over all its phases."""
    pre = 0 if arm.pretrain is None else len(arm.pretrain[1])  # the TSTR set: all synthetic
    return len(arm.labels) + pre, int(arm.synthetic.sum()) + pre


def evaluate_utility(
    real_x: np.ndarray,
    real_y: np.ndarray,
    syn_x: np.ndarray,
    syn_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    classes: Sequence[str],
    config: ClassifierConfig,
    seeds: Sequence[int],
    *,
    arms: Sequence[str] = ARMS,
    device: torch.device | str = "cpu",
    on_progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> UtilityResult:
    """Train every arm once per seed and score it on the real test images (unseen
    patients; every class must occur among them). Deterministic for a seed on CPU."""
    arms = _check_arms(arms)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("at least one seed is needed")
    num_classes = len(classes)
    if num_classes < 2:
        raise ValueError("at least 2 classes are needed")
    if real_x.ndim != 3 or real_x.shape[1] != real_x.shape[2] or real_x.shape[1] not in RESOLUTIONS:
        raise ValueError(f"images must be square, of a side in {RESOLUTIONS}")
    test_y = np.asarray(test_y, dtype=np.int64)
    test_counts = np.bincount(test_y, minlength=num_classes)
    if len(test_counts) > num_classes or (test_counts == 0).any():
        raise ValueError("every class needs at least one test image, and no other label")
    for name, x in (("real", real_x), ("synthetic", syn_x), ("test", test_x)):
        if name == "synthetic" and len(x) == 0:
            continue
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != real_x.shape[1:]:
            raise ValueError(f"{name} images must be uint8 (N, R, R) of one resolution")
    scores: dict[str, list[ArmScores]] = {a: [] for a in arms}
    total, done = len(seeds) * len(arms), 0
    for seed in seeds:
        sets = build_arms(
            real_x, real_y, syn_x, syn_y, num_classes, np.random.default_rng(seed), arms
        )
        for arm in arms:
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped after {done} of {total} arm runs")
            start = time.perf_counter()
            model = train_classifier(sets[arm], num_classes, config, seed, device)
            acc, bal, auroc, recall = classification_scores(
                test_y, predict_proba(model, test_x, device), num_classes
            )
            scores[arm].append(
                ArmScores(
                    accuracy=acc,
                    balanced_accuracy=bal,
                    macro_auroc=auroc,
                    recall=recall,
                    train_images=_train_images(sets[arm])[0],
                    synthetic_images=_train_images(sets[arm])[1],
                    seconds=time.perf_counter() - start,
                )
            )
            done += 1
            if on_progress is not None:
                on_progress(done, total, f"seed {seed} {arm}: balanced accuracy {bal:.3f}")
    summary, vs_ds1 = _summarise(scores, num_classes)
    return UtilityResult(
        classes=list(classes),
        arms=arms,
        seeds=seeds,
        config=config.to_dict(),
        scores=scores,
        summary=summary,
        vs_ds1=vs_ds1,
        test_images=len(test_y),
        test_counts=[int(c) for c in test_counts],
    )


# --------------------------------------------------------------------------- chart


def chart_png(result: UtilityResult) -> bytes:
    """A PNG, 1000 x 850 px, in two panels.

    Top: balanced accuracy per arm, the mean over seeds with its 95% t-interval as error
    bars (drawn clipped to [0, 1]; two seeds give very wide intervals), the DS1 mean
    dashed and chance dotted. Bottom: recall per class, one bar per arm in each class's
    group (with error bars up to 4 classes), DS1's recall dashed over the group; one
    legend for the arm colours.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no display, no pyplot
    from matplotlib.figure import Figure

    arms, classes, summ = result.arms, result.classes, result.summary
    colors = dict(zip(ARMS, _ARM_COLORS, strict=True))
    n_seeds = len(result.seeds)
    fig = Figure(figsize=(10, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, height_ratios=[1, 1.1])

    def bars(cells: list[dict[str, Any]]) -> tuple[list[float], np.ndarray | None]:
        means = [d["mean"] for d in cells]
        if n_seeds < 2:
            return means, None
        low = [max(0.0, min(d["low"], d["mean"])) for d in cells]
        high = [min(1.0, max(d["high"], d["mean"])) for d in cells]
        err = np.array([np.subtract(means, low), np.subtract(high, means)])  # (2, bars)
        return means, err

    # Top panel: one bar per arm.
    xs = np.arange(len(arms))
    means, err = bars([summ[a]["balanced_accuracy"] for a in arms])
    top.bar(xs, means, color=[colors[a] for a in arms], edgecolor="black", linewidth=0.6)
    if err is not None:
        top.errorbar(xs, means, yerr=err, fmt="none", ecolor="black", capsize=6, lw=1.2)
    for x, m, e in zip(xs, means, err[1] if err is not None else [0.0] * len(xs), strict=True):
        top.text(x, m + e + 0.015, f"{m:.3f}", ha="center", va="bottom", fontsize=10)
    if "DS1" in summ:
        top.axhline(summ["DS1"]["balanced_accuracy"]["mean"], color="black", ls="--", lw=1)
    top.axhline(1.0 / len(classes), color="dimgrey", ls=":", lw=1.2)
    top.set_xticks(xs, arms, fontsize=11)
    top.set_ylim(0, 1.12)
    top.set_ylabel("balanced accuracy", fontsize=11)
    seeds = f"{n_seeds} seed{'s' if n_seeds != 1 else ''}"
    spread = "error bars: 95% t-interval" if n_seeds > 1 else "one seed: no interval"
    top.set_title(
        f"Balanced accuracy on {result.test_images} real test images, mean of {seeds}\n"
        f"{spread}; dashed: DS1 (real only); dotted: chance",
        fontsize=11,
    )
    top.grid(axis="y", alpha=0.3)

    # Bottom panel: recall per class, grouped by class.
    group = 0.84 / len(arms)
    cx = np.arange(len(classes))
    recall_bars = len(classes) <= 4  # beyond, error bars hide the bars
    for i, a in enumerate(arms):
        means, err = bars(summ[a]["recall"])
        at = cx - 0.42 + group * (i + 0.5)
        bottom.bar(
            at, means, width=group, color=colors[a], edgecolor="black", linewidth=0.4, label=a
        )
        if err is not None and recall_bars:
            bottom.errorbar(at, means, yerr=err, fmt="none", ecolor="black", capsize=1.5, lw=0.7)
    if "DS1" in summ:
        for c, r in enumerate(summ["DS1"]["recall"]):
            bottom.hlines(r["mean"], c - 0.46, c + 0.46, colors="black", linestyles="--", lw=1)
    many = len(classes) > 6
    bottom.set_xticks(
        cx,
        [
            f"{n} (n={k})" if many else f"{n}\n(n={k})"
            for n, k in zip(classes, result.test_counts, strict=True)
        ],
        fontsize=9 if many else 10,
        rotation=30 if many else 0,
        ha="right" if many else "center",
    )
    bottom.set_xlim(-0.5, len(classes) - 0.5)
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("recall (sensitivity)", fontsize=11)
    shown = "error bars: 95% t-interval; " if n_seeds > 1 and recall_bars else ""
    bottom.set_title(
        f"Recall per class, mean of {seeds} (n: test images); {shown}dashed: DS1", fontsize=11
    )
    bottom.grid(axis="y", alpha=0.3)
    fig.legend(
        *bottom.get_legend_handles_labels(),
        loc="outside lower center",
        ncol=min(len(arms), 8),
        fontsize=10,
        frameon=False,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# One colour per arm, the same in both panels: greys for real-only, blues for DS2 family,
# and distinct hues for the synthetic-only and pre-training arms.
_ARM_COLORS = (
    "#9e9e9e",  # DS1
    "#1f77b4",  # DS2
    "#d9d9d9",  # DS3
    "#d62728",  # TSTR
    "#636363",  # AUG
    "#6baed6",  # DS2+AUG
    "#2ca02c",  # DS2-even
    "#ff7f0e",  # PRE
)
