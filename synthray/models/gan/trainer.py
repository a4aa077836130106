"""Training loop for the class-conditional GANs, with a step/time budget and exact resume.

Architectures (networks, loss, defaults) come from :mod:`synthray.models.gan.registry`.

The algorithm is Algorithm 1 of Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014,
one discriminator update per generator update, with the Adam settings of Radford et al., ICLR
2016 (lr 2e-4, beta1 0.5). Per architecture:

- ``dcgan`` (:mod:`synthray.models.gan.dcgan`): the non-saturating loss of Goodfellow et al.,
  Section 3; by default no augmentation and no EMA (the seed study's baseline).
- ``projgan`` (:mod:`synthray.models.gan.projgan`): the hinge loss of Lim and Ye, "Geometric GAN",
  2017 (arXiv:1705.02894), as used with spectral normalisation and the projection
  discriminator by Miyato et al. 2018; by default DiffAugment (Zhao et al., NeurIPS 2020,
  :mod:`synthray.models.gan.diffaugment`) on every discriminator input, and an exponential moving
  average of the generator's weights (Yazici et al., "The Unusual Effectiveness of Averaging in
  GAN Training", ICLR 2019; Karras et al. 2018), which is the generator the run returns.

All state lives in a :class:`_Trainer` instance; a checkpoint holds everything that instance
needs (networks, the EMA generator, optimizers, RNG states, budget counters and the configs), so
a killed run that is started again ends with the same weights as an uninterrupted one on the
same device and precision.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from synthray.models.checkpoint import (
    flatten_state_dict,
    load_state,
    save_state,
    unflatten_state_dict,
)
from synthray.models.gan.config import (
    RESUME_FREE_FIELDS,
    TrainConfig,
    TrainProgress,
    TrainResult,
    validate_data,
)
from synthray.models.gan.diffaugment import diff_augment, parse_policy
from synthray.models.gan.registry import get as architecture
from synthray.models.runtime import (
    autocast_dtype,
    resolve_device,
    resolve_precision,
    to_channels_last,
)

logger = logging.getLogger(__name__)

EMA_WARMUP = 10  # decay at step t is min(ema_decay, (1 + t) / (EMA_WARMUP + t))
CHECKPOINT_KIND = "train_checkpoint"
CHECKPOINT_FORMAT = 1


def _data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr((images.shape, labels.shape)).encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels).data)
    return h.hexdigest()


def _to_cpu_fp32(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        out[k] = (v.float() if v.is_floating_point() else v).contiguous().clone()
    return out


class _Trainer:
    """Networks, optimizers, RNGs and counters of one training run."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        cfg: TrainConfig,
        device: torch.device,
        precision: str,
    ) -> None:
        self.cfg = cfg
        self.gcfg = cfg.generator_config()
        self.device = device
        self.precision = precision
        self.images = images  # (N, R, R) uint8
        self.num_classes = len(cfg.class_names)
        # Real batches: a class with P(c) ~ n_c ** class_power (uniformly at the default 0),
        # then an image of that class uniformly. Generated labels follow the same P(c).
        self.order = np.argsort(labels, kind="stable")  # image indices grouped by class
        self.class_counts = np.bincount(labels, minlength=self.num_classes)  # (C,)
        self.class_starts = np.cumsum(self.class_counts) - self.class_counts  # (C,)
        self.class_power = float(cfg.class_power or 0.0)
        weights = self.class_counts.astype(np.float64) ** self.class_power
        self.class_probs = weights / weights.sum()  # (C,)

        # All randomness comes from these two generators, both on CPU, so runs are reproducible
        # and the global RNGs are left alone.
        self.torch_rng = torch.Generator(device="cpu")
        self.torch_rng.manual_seed(cfg.seed)
        self.np_rng = np.random.Generator(np.random.PCG64(cfg.seed))

        self.arch = architecture(cfg.architecture)
        self.G, self.D = self.arch.build(self.gcfg, self.torch_rng)
        self.G.to(device)
        self.D.to(device)
        # NHWC: faster convolutions on CUDA and on CPU, in bf16 and in fp32 (AVX2 fp32: -15%).
        to_channels_last(self.G)
        to_channels_last(self.D)
        self.augment_policy = parse_policy(str(cfg.augment))
        self.ema_decay = float(cfg.ema_decay or 0.0)
        # The EMA generator is never trained: it starts as a copy of G and follows it.
        self.G_ema: nn.Module | None = None
        if self.ema_decay > 0:
            self.G_ema = copy.deepcopy(self.G).requires_grad_(False)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=betas)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.step = 0
        self.images_seen = 0
        self.seconds_before = 0.0  # training time spent by earlier processes (resume)
        self.loss_d: Tensor | float = math.nan
        self.loss_g: Tensor | float = math.nan
        self.fingerprint = ""
        self.resumed = False

    # ----------------------------------------------------------------------------- batches
    def _autocast(self) -> AbstractContextManager[Any]:
        dtype = autocast_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _to_device_images(self, x: np.ndarray) -> Tensor:
        t = torch.from_numpy(x).to(self.device, non_blocking=True)  # (B, R, R) uint8
        t = t.unsqueeze(1).float().div_(127.5).sub_(1.0)  # (B, 1, R, R) in [-1, 1]
        return t.contiguous(memory_format=torch.channels_last)

    def _real_batch(self) -> tuple[Tensor, Tensor]:
        b = self.cfg.batch_size
        if self.class_power == 0:
            cls = self.np_rng.integers(0, self.num_classes, size=b)  # (B,)
        else:
            cls = self.np_rng.choice(self.num_classes, size=b, p=self.class_probs)  # (B,)
        within = self.np_rng.integers(0, self.class_counts[cls])  # (B,) index inside the class
        idx = self.order[self.class_starts[cls] + within]  # (B,)
        x = self._to_device_images(self.images[idx])  # (B, 1, R, R)
        y = torch.from_numpy(cls.astype(np.int64)).to(self.device)  # (B,)
        return x, y

    def _noise(self) -> tuple[Tensor, Tensor]:
        b = self.cfg.batch_size
        z = torch.randn(b, self.gcfg.z_dim, generator=self.torch_rng)  # (B, z_dim)
        if self.class_power == 0:
            y = torch.randint(0, self.num_classes, (b,), generator=self.torch_rng)  # (B,)
        else:
            probs = torch.from_numpy(self.class_probs)  # (C,)
            y = torch.multinomial(probs, b, replacement=True, generator=self.torch_rng)  # (B,)
        return z.to(self.device), y.to(self.device)

    def _augment(self, x: Tensor) -> Tensor:
        """DiffAugment of a discriminator input (identity when the policy is empty)."""
        if not self.augment_policy:
            return x
        return diff_augment(x, self.augment_policy, self.torch_rng)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """G_ema <- d G_ema + (1 - d) G, d = min(ema_decay, (1 + t) / (EMA_WARMUP + t)); the
        warm-up lets the average forget the random initialisation within the first steps.
        Buffers (batch-norm running statistics) are copied."""
        if self.G_ema is None:
            return
        t = self.step
        decay = min(self.ema_decay, (1 + t) / (EMA_WARMUP + t))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - decay)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            b_ema.copy_(b)

    def _backward_step(self, loss: Tensor, opt: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
        else:
            loss.backward()
            opt.step()

    # -------------------------------------------------------------------------------- step
    def train_step(self) -> None:
        x, y_real = self._real_batch()  # (B, 1, R, R), (B,)
        z, y_fake = self._noise()  # (B, z_dim), (B,)
        loss = self.arch.loss  # see synthray.models.gan.losses

        # Update D on real images and detached generated ones, each through a fresh DiffAugment
        # draw T (identity when augmentation is off): non-saturating, maximise
        # log D(T(x)|y) + log(1 - D(T(G(z|y'))|y')); hinge, minimise
        # E[max(0, 1 - D(T(x)|y))] + E[max(0, 1 + D(T(G(z|y'))|y'))].
        self.opt_d.zero_grad(set_to_none=True)
        with self._autocast():
            fake = self.G(z, y_fake)  # (B, 1, R, R)
            logits_real = self.D(self._augment(x), y_real)  # (B,)
            logits_fake = self.D(self._augment(fake.detach()), y_fake)  # (B,)
        loss_d = loss.discriminator(logits_real, logits_fake)
        self._backward_step(loss_d, self.opt_d)

        # Update G: non-saturating, maximise log D(T(G(z|y'))|y'); hinge, minimise
        # -E[D(T(G(z|y'))|y')]. D's weights are frozen so only G receives gradients; T is
        # differentiable, so G learns un-augmented images.
        self.opt_g.zero_grad(set_to_none=True)
        self.D.requires_grad_(False)
        try:
            with self._autocast():
                logits_gen = self.D(self._augment(fake), y_fake)  # (B,)
            loss_g = loss.generator(logits_gen)
            self._backward_step(loss_g, self.opt_g)
        finally:
            self.D.requires_grad_(True)
        if self.scaler is not None:
            self.scaler.update()

        self.loss_d = loss_d.detach()
        self.loss_g = loss_g.detach()
        self.step += 1
        self.images_seen += self.cfg.batch_size
        self._update_ema()

    # ------------------------------------------------------------------------- checkpoints
    def checkpoint_payload(self, seconds: float) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        tensors.update({f"G.{k}": v for k, v in self.G.state_dict().items()})
        tensors.update({f"D.{k}": v for k, v in self.D.state_dict().items()})
        if self.G_ema is not None:
            tensors.update({f"G_ema.{k}": v for k, v in self.G_ema.state_dict().items()})
        opt_g_tensors, opt_g_structure = flatten_state_dict(self.opt_g.state_dict(), "opt_g.")
        opt_d_tensors, opt_d_structure = flatten_state_dict(self.opt_d.state_dict(), "opt_d.")
        tensors.update(opt_g_tensors)
        tensors.update(opt_d_tensors)
        # One torch generator draws the noise, the labels and the DiffAugment parameters.
        tensors["rng.torch"] = self.torch_rng.get_state()  # (S,) uint8
        meta: dict[str, Any] = {
            "kind": CHECKPOINT_KIND,
            "format": CHECKPOINT_FORMAT,
            "architecture": self.cfg.architecture,
            "train_config": self.cfg.to_dict(),
            "generator_config": self.gcfg.to_dict(),
            "step": self.step,
            "images_seen": self.images_seen,
            "seconds": seconds,
            "loss_d": float(self.loss_d),
            "loss_g": float(self.loss_g),
            "rng_numpy": self.np_rng.bit_generator.state,
            "opt_g": opt_g_structure,
            "opt_d": opt_d_structure,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data_fingerprint": self.fingerprint,
            "device": str(self.device),
            "precision": self.precision,
        }
        return tensors, meta

    def save_checkpoint(self, path: Path, seconds: float) -> None:
        tensors, meta = self.checkpoint_payload(seconds)
        save_state(path, tensors, meta)

    def resume_matches(self, meta: dict[str, Any]) -> str | None:
        """None when ``meta`` is a checkpoint of this very run, else the reason it is not."""
        if meta.get("kind") != CHECKPOINT_KIND or meta.get("format") != CHECKPOINT_FORMAT:
            return "not a training checkpoint of this format"
        stored = meta.get("train_config")
        if not isinstance(stored, dict):
            return "no train_config"
        try:  # a checkpoint written before a field existed holds that field's default
            stored = TrainConfig.from_dict(stored).to_dict()
        except (ValueError, TypeError) as exc:
            return f"train_config unusable ({exc})"
        mine = self.cfg.to_dict()
        differing = sorted(
            k
            for k in set(stored) | set(mine)
            if k not in RESUME_FREE_FIELDS and stored.get(k) != mine.get(k)
        )
        if differing:
            return f"train_config differs in {differing}"
        if meta.get("data_fingerprint") != self.fingerprint:
            return "training data differ"
        if meta.get("precision") != self.precision:
            return f"precision differs ({meta.get('precision')} vs {self.precision})"
        return None

    def load_checkpoint(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        def sub(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.G.load_state_dict(sub("G."))
        self.D.load_state_dict(sub("D."))
        if self.G_ema is not None:
            self.G_ema.load_state_dict(sub("G_ema."))
        self.opt_g.load_state_dict(unflatten_state_dict(tensors, meta["opt_g"]))
        self.opt_d.load_state_dict(unflatten_state_dict(tensors, meta["opt_d"]))
        for opt in (self.opt_g, self.opt_d):  # give Adam moments their parameter's layout
            for group in opt.param_groups:
                for p in group["params"]:
                    state = opt.state.get(p, {})
                    for k, v in state.items():
                        if isinstance(v, Tensor) and v.shape == p.shape and v.dtype == p.dtype:
                            state[k] = torch.empty_like(p).copy_(v)
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.torch_rng.set_state(tensors["rng.torch"].contiguous())
        self.np_rng.bit_generator.state = meta["rng_numpy"]
        self.step = int(meta["step"])
        self.images_seen = int(meta["images_seen"])
        self.seconds_before = float(meta["seconds"])
        self.loss_d = float(meta["loss_d"])
        self.loss_g = float(meta["loss_g"])
        self.resumed = True

    # ------------------------------------------------------------------------------- run
    def progress(self, seconds: float, run_steps: int, run_seconds: float) -> TrainProgress:
        cfg = self.cfg
        steps_per_s = run_steps / run_seconds if run_seconds > 0 else 0.0
        etas: list[float] = []
        if cfg.max_steps is not None and steps_per_s > 0:
            etas.append(max(0, cfg.max_steps - self.step) / steps_per_s)
        if cfg.max_seconds is not None:
            etas.append(max(0.0, cfg.max_seconds - seconds))
        return TrainProgress(
            step=self.step,
            total_steps=cfg.max_steps,
            images_seen=self.images_seen,
            seconds=seconds,
            images_per_second=steps_per_s * cfg.batch_size,
            loss_d=float(self.loss_d),
            loss_g=float(self.loss_g),
            eta_seconds=min(etas) if etas else None,
        )

    def run(
        self,
        checkpoint_path: Path | None,
        on_progress: Callable[[TrainProgress], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> TrainResult:
        cfg = self.cfg
        self.G.train()
        self.D.train()
        t0 = time.perf_counter()
        start_step = self.step
        last_progress = last_checkpoint = t0
        saved_step = self.step if self.resumed else -1
        stopped = "budget"

        def elapsed() -> float:
            return self.seconds_before + (time.perf_counter() - t0)

        while True:
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break
            if cfg.max_seconds is not None and elapsed() >= cfg.max_seconds:
                break
            if should_stop is not None and should_stop():
                stopped = "cancelled"
                break
            self.train_step()
            now = time.perf_counter()
            if on_progress is not None and now - last_progress >= cfg.progress_every_s:
                on_progress(self.progress(elapsed(), self.step - start_step, now - t0))
                last_progress = time.perf_counter()
            if checkpoint_path is not None and now - last_checkpoint >= cfg.checkpoint_every_s:
                self.save_checkpoint(checkpoint_path, elapsed())
                saved_step = self.step
                last_checkpoint = time.perf_counter()

        seconds = elapsed()
        run_seconds = time.perf_counter() - t0
        if checkpoint_path is not None and saved_step != self.step:
            self.save_checkpoint(checkpoint_path, seconds)
        if on_progress is not None:
            on_progress(self.progress(seconds, self.step - start_step, run_seconds))
        final_g = self.G_ema if self.G_ema is not None else self.G
        return TrainResult(
            generator_config=self.gcfg.to_dict(),
            generator_state=_to_cpu_fp32(final_g.state_dict()),
            steps=self.step,
            images_seen=self.images_seen,
            seconds=seconds,
            final_loss_d=float(self.loss_d),
            final_loss_g=float(self.loss_g),
            device=str(self.device),
            precision=self.precision,
            stopped=stopped,
            architecture=cfg.architecture,
        )


def train_gan(
    images: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    *,
    checkpoint_path: Path | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a class-conditional GAN on ``images`` (uint8 (N, R, R)) and ``labels`` (N,).

    Real batches draw a class with P(c) ~ n_c ** ``cfg.class_power`` (uniformly, i.e.
    class-balanced, for dcgan), then one of its images uniformly. Never flipped (chest
    radiographs are not left-right symmetric); ``cfg.augment`` names the DiffAugment transforms
    applied to every discriminator input (none for dcgan). Stops at
    ``cfg.max_steps`` or once ``cfg.max_seconds`` of training time is used, whichever comes
    first, or with ``stopped="cancelled"`` when ``should_stop()`` (asked before every step)
    returns True.

    With ``checkpoint_path``, the full training state is saved atomically every
    ``cfg.checkpoint_every_s`` seconds, on cancellation and at the end. A checkpoint already
    there is resumed when it belongs to the same run (same config apart from budget and
    cadence, same data, same precision); its training time counts toward ``max_seconds``.
    A checkpoint of a different run is ignored and overwritten (logged as a warning).
    Global torch settings (threads, global RNG) are not changed, except that
    ``cudnn.benchmark`` is switched on when training on CUDA.
    """
    cfg.validate()
    images, labels = validate_data(images, labels, cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    trainer = _Trainer(images, labels, cfg, device, precision)
    if checkpoint_path is not None:
        checkpoint_path = Path(checkpoint_path)
        trainer.fingerprint = _data_fingerprint(images, labels)
        if checkpoint_path.exists():
            try:
                tensors, meta = load_state(checkpoint_path)
                reason = trainer.resume_matches(meta)
            except Exception as exc:  # unreadable file: start afresh rather than fail forever
                reason = f"unreadable ({exc})"
            if reason is None:
                trainer.load_checkpoint(tensors, meta)
                logger.info("resuming %s at step %d", checkpoint_path, trainer.step)
            else:
                logger.warning("not resuming from %s: %s", checkpoint_path, reason)
    return trainer.run(checkpoint_path, on_progress, should_stop)
