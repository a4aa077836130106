"""What defines a training run (:class:`TrainConfig`), what it reports while it runs
(:class:`TrainProgress`) and what it returns (:class:`TrainResult`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from torch import Tensor

from synthray.models.generators.diffaugment import parse_policy
from synthray.models.generators.registry import ARCHITECTURES, GeneratorConfig
from synthray.models.generators.registry import get as architecture
from synthray.models.runtime import PRECISIONS, resolve_device, resolve_precision


def _runs_fp32_on_cpu(device: str, precision: str) -> bool:
    """Whether a run asking for ``device`` and ``precision`` trains in fp32 on a CPU here
    (False for settings ``validate`` refuses)."""
    try:
        dev = resolve_device(device)
        return dev.type == "cpu" and resolve_precision(precision, dev) == "fp32"
    except (ValueError, RuntimeError):
        return False


# TrainConfig fields that may change between a checkpoint and the run that resumes it.
RESUME_FREE_FIELDS = frozenset(
    {"max_steps", "max_seconds", "checkpoint_every_s", "progress_every_s"}
)


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``class_names`` must not be empty.

    Fields left at None take their architecture's default (its registry entry's ``defaults``)
    when the config is built, so ``to_dict`` always records the values the run used; where the
    architecture has other defaults for runs in fp32 on a CPU (``cpu_fp32_defaults``), the
    device and precision are resolved on this machine to choose them. A field
    that belongs to another family of architectures must stay None (a GAN has no
    ``guidance``, the latent flow no ``lr_d``).

    Every architecture: ``batch_size`` (for the latent flow, the flow phase's batch);
    ``ema_decay`` (0 keeps no EMA copy of the generator); ``class_power`` sets how often each
    class is drawn, for real batches and generated labels alike: P(c) proportional to
    n_c ** class_power, n_c its number of training images (0: all classes equally often, 1:
    as often as in the data).

    GANs: ``augment`` is ``"none"`` or a comma list of DiffAugment transforms (``color``,
    ``translation``, ``cutout``); the learning rates, Adam betas, z_dim and widths.

    Latent flow (:mod:`synthray.models.generators.latentflow`): the run first trains the
    autoencoder for ``ae_fraction`` of the budget (of the steps, or of the seconds), then
    the flow on its latents; ``ae_crop`` (pixels, a multiple of the autoencoder's stride;
    0 or not below the resolution: whole images) trains the fully convolutional autoencoder
    on random crops for the first part of its phase, which costs a fraction of a whole image
    per step; ``guidance``, ``guidance_interval`` and ``sample_steps`` are how the generator
    samples, stored in its config.
    """

    architecture: str = "dcgan"
    resolution: int = 64
    class_names: list[str] = field(default_factory=list)
    batch_size: int | None = None  # GANs 64, latentflow 32
    max_steps: int | None = None
    max_seconds: float | None = None
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32 (| fp16 on CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every_s: float = 60.0
    progress_every_s: float = 5.0
    ema_decay: float | None = None  # dcgan 0 (no EMA), projgan 0.999, latentflow 0.995
    class_power: float | None = None  # dcgan 0 (class-balanced), projgan and latentflow 0.5
    # GANs
    lr_g: float | None = None  # 2e-4
    lr_d: float | None = None  # 2e-4
    beta1: float | None = None  # 0.5
    beta2: float | None = None  # 0.999
    z_dim: int | None = None  # 100
    g_channels: int | None = None  # dcgan 64, projgan 32
    d_channels: int | None = None  # dcgan 64, projgan 64
    augment: str | None = None  # dcgan "none", projgan "color,translation,cutout"
    # Latent flow
    ae_fraction: float | None = None  # share of the budget spent on the autoencoder
    ae_batch_size: int | None = None
    ae_crop: int | None = None  # autoencoder trained on crops of this side (0: whole)
    lr_ae: float | None = None
    lr_flow: float | None = None
    # Share of the flow's phase, at its end, over which its learning rate falls linearly to
    # 0 (warmup-stable-decay; 0: constant to the end).
    flow_cooldown: float | None = None
    latent_size: int | None = None  # the latent grid's side
    latent_channels: int | None = None
    ae_width: int | None = None  # autoencoder channels at full resolution
    flow_width: int | None = None  # velocity U-Net channels at the latent's side
    label_dropout: float | None = None  # share of flow batches trained without their class
    guidance: float | None = None  # classifier-free guidance weight when sampling
    sample_steps: int | None = None  # Heun steps when sampling
    # [t_low, t_high]: guidance only at flow times t_low < t <= t_high ([0, 1]: always)
    guidance_interval: list[float] | None = None

    def __post_init__(self) -> None:
        self.class_names = list(self.class_names)
        if self.architecture in ARCHITECTURES:
            arch = ARCHITECTURES[self.architecture]
            cpu_fp32 = any(
                getattr(self, name) is None
                for name in arch.cpu_fp32_defaults.get(self.resolution, {})
            ) and _runs_fp32_on_cpu(self.device, self.precision)
            for name, value in arch.defaults_at(self.resolution, cpu_fp32=cpu_fp32).items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if self.guidance_interval is not None:  # a copy (defaults are shared), JSON's type
            self.guidance_interval = [_number(t) for t in self.guidance_interval]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on any setting the training loop cannot honour."""
        arch = architecture(self.architecture)
        if not self.class_names:
            raise ValueError("class_names must list at least one class")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be unique, got {self.class_names}")
        foreign = sorted(
            name
            for name in FAMILY_FIELDS
            if name not in arch.defaults and getattr(self, name) is not None
        )
        if foreign:
            raise ValueError(f"{foreign} do not apply to the {arch.name} architecture")
        if self.max_steps is None and self.max_seconds is None:
            raise ValueError("set max_steps or max_seconds (or both): training needs a budget")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.max_seconds is not None and not self.max_seconds >= 0:
            raise ValueError(f"max_seconds must be >= 0, got {self.max_seconds}")
        for name in ("batch_size", "ae_batch_size"):
            value = getattr(self, name)
            if name in arch.defaults and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not (
            self.device in ("auto", "cpu", "cuda")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.checkpoint_every_s < 0 or self.progress_every_s < 0:
            raise ValueError("checkpoint_every_s and progress_every_s must be >= 0")
        for name in ("lr_g", "lr_d", "lr_ae", "lr_flow"):
            if name in arch.defaults and not _number(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0")
        if "beta1" in arch.defaults and not (
            0 <= _number(self.beta1) < 1 and 0 <= _number(self.beta2) < 1
        ):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if "augment" in arch.defaults:
            if not isinstance(self.augment, str):
                raise ValueError(f"augment must be a string, got {self.augment!r}")
            parse_policy(self.augment)
        if not (isinstance(self.ema_decay, int | float) and 0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not (isinstance(self.class_power, int | float) and 0 <= self.class_power <= 1):
            raise ValueError(f"class_power must be in [0, 1], got {self.class_power!r}")
        if "ae_fraction" in arch.defaults and not 0 < _number(self.ae_fraction) < 1:
            raise ValueError(f"ae_fraction must be in (0, 1), got {self.ae_fraction!r}")
        if "ae_crop" in arch.defaults:
            ratio = self.resolution // int(self.latent_size or 1)
            crop = self.ae_crop
            if not (isinstance(crop, int) and not isinstance(crop, bool) and crop >= 0) or (
                crop and crop % ratio
            ):
                raise ValueError(
                    f"ae_crop must be 0 or a multiple of {ratio} (the autoencoder's stride), "
                    f"got {crop!r}"
                )
        if "flow_cooldown" in arch.defaults and not 0 <= _number(self.flow_cooldown) <= 1:
            raise ValueError(f"flow_cooldown must be in [0, 1], got {self.flow_cooldown!r}")
        if "label_dropout" in arch.defaults and not 0 <= _number(self.label_dropout) < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout!r}")
        if self.resolution not in arch.resolutions:
            raise ValueError(
                f"{arch.name} resolution must be one of {arch.resolutions}, got {self.resolution}"
            )
        self.generator_config()  # validates the networks' own settings

    def generator_config(self) -> GeneratorConfig:
        arch = architecture(self.architecture)
        values = {name: getattr(self, name) for name in arch.config_fields}
        return arch.config(resolution=self.resolution, num_classes=len(self.class_names), **values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {sorted(unknown)}")
        return cls(**d)


def _number(value: Any) -> float:
    """``value`` as a float for range checks; NaN (which fails every check) otherwise."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return math.nan


# TrainConfig fields that only some architectures have (each lists its own in ``defaults``).
FAMILY_FIELDS = (
    "batch_size",
    "lr_g",
    "lr_d",
    "beta1",
    "beta2",
    "z_dim",
    "g_channels",
    "d_channels",
    "augment",
    "ae_fraction",
    "ae_batch_size",
    "ae_crop",
    "lr_ae",
    "lr_flow",
    "flow_cooldown",
    "latent_size",
    "latent_channels",
    "ae_width",
    "flow_width",
    "label_dropout",
    "guidance",
    "sample_steps",
    "guidance_interval",
)


@dataclass
class TrainProgress:
    step: int
    total_steps: int | None
    images_seen: int
    seconds: float
    images_per_second: float  # throughput of this process's part of the run
    losses: dict[str, float]  # GANs: "d", "g"; latent flow: "reconstruction" or "flow"
    eta_seconds: float | None
    phase: str = "train"  # latent flow: "autoencoder", then "flow"


@dataclass
class TrainResult:
    generator_config: dict[str, Any]
    generator_state: dict[str, Tensor]  # on CPU, floating tensors in fp32
    steps: int
    images_seen: int
    seconds: float
    final_losses: dict[str, float]
    device: str
    precision: str
    stopped: str  # "budget" or "cancelled"
    architecture: str = "dcgan"  # rebuilds the generator with generator_config
    # Steps per phase (the latent flow: autoencoder and flow), summing to ``steps``.
    phase_steps: dict[str, int] = field(default_factory=dict)


def validate_data(
    images: np.ndarray, labels: np.ndarray, cfg: TrainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Check training data against ``cfg``; the labels come back as int64."""
    r = cfg.resolution
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError("images must be a uint8 numpy array of shape (N, R, R)")
    if images.shape[1:] != (r, r):
        raise ValueError(
            f"images are {images.shape[1]}x{images.shape[2]} but cfg.resolution is {r}: "
            "resize them first"
        )
    n = images.shape[0]
    if n == 0:
        raise ValueError("no training images")
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}"
        )
    labels = labels.astype(np.int64, copy=False)
    c = len(cfg.class_names)
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must be in [0, {c}), got range [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=c)
    empty = [cfg.class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"classes without any training image: {empty}")
    return images, labels
