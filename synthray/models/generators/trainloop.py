"""What every training loop shares: the step/time budget, progress reports, periodic atomic
checkpoints, cancellation, and the rule for resuming a checkpoint.

A family's trainer (:mod:`~synthray.models.generators.gan_trainer`,
:mod:`~synthray.models.generators.flow_trainer`) subclasses :class:`BudgetedRun` and supplies
one optimisation step, its checkpoint payload and how to load it back, and the generator it
returns. All state lives in the instance; a checkpoint holds all of it, so a killed run that
is started again ends with the same weights as an uninterrupted one on the same device and
precision.
"""

from __future__ import annotations

import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from synthray.models.checkpoint import load_state, save_state
from synthray.models.generators.config import (
    RESUME_FREE_FIELDS,
    TrainConfig,
    TrainProgress,
    TrainResult,
)
from synthray.models.runtime import autocast_dtype

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "train_checkpoint"
CHECKPOINT_FORMAT = 1


def data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr((images.shape, labels.shape)).encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels).data)
    return h.hexdigest()


def to_cpu_fp32(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        out[k] = (v.float() if v.is_floating_point() else v).contiguous().clone()
    return out


def ema_decay_at(step: int, ema_decay: float, warmup: int = 10) -> float:
    """min(ema_decay, (1 + t) / (warmup + t)): the average forgets the random initialisation
    within the first steps."""
    return min(ema_decay, (1 + step) / (warmup + step))


class ClassSampler:
    """Draws a class with P(c) ~ n_c ** power, then one of its items uniformly, from numpy
    and torch generators the caller owns (so draws are part of the checkpointed state)."""

    def __init__(self, labels: np.ndarray, num_classes: int, power: float) -> None:
        self.order = np.argsort(labels, kind="stable")  # indices grouped by class
        self.counts = np.bincount(labels, minlength=num_classes)  # (C,)
        self.starts = np.cumsum(self.counts) - self.counts  # (C,)
        self.num_classes = num_classes
        self.power = float(power)
        weights = self.counts.astype(np.float64) ** self.power
        self.probs = weights / weights.sum()  # (C,)

    def classes(self, size: int, rng: np.random.Generator) -> np.ndarray:
        if self.power == 0:
            return rng.integers(0, self.num_classes, size=size)  # (B,)
        return rng.choice(self.num_classes, size=size, p=self.probs)  # (B,)

    def items(self, cls: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        within = rng.integers(0, self.counts[cls])  # (B,) index inside the class
        return self.order[self.starts[cls] + within]  # (B,)

    def labels(self, size: int, gen: torch.Generator) -> Tensor:
        """Class ids drawn with the same P(c), from a torch generator."""
        if self.power == 0:
            return torch.randint(0, self.num_classes, (size,), generator=gen)
        probs = torch.from_numpy(self.probs)
        return torch.multinomial(probs, size, replacement=True, generator=gen)


class BudgetedRun(ABC):
    """One training run: budget, cadence, checkpoints; a subclass supplies the steps."""

    def __init__(self, cfg: TrainConfig, device: torch.device, precision: str) -> None:
        self.cfg = cfg
        self.device = device
        self.precision = precision
        # All randomness comes from these two generators, both on CPU, so runs are
        # reproducible and the global RNGs are left alone.
        self.torch_rng = torch.Generator(device="cpu")
        self.torch_rng.manual_seed(cfg.seed)
        self.np_rng = np.random.Generator(np.random.PCG64(cfg.seed))
        self.step = 0
        self.images_seen = 0
        self.seconds_before = 0.0  # training time spent by earlier processes (resume)
        self.fingerprint = ""
        self.resumed = False
        self._start_step = 0  # the step this process started at (for the ETA)

    # ------------------------------------------------------------- for the subclasses
    @abstractmethod
    def train_step(self, elapsed: float) -> None:
        """One optimisation step (``elapsed``: training seconds so far, resumes included);
        advances ``step`` and ``images_seen``."""

    @abstractmethod
    def losses(self) -> dict[str, float]:
        """The last step's losses, by name."""

    def phase(self) -> str:
        return "train"

    def phase_steps(self) -> dict[str, int]:
        """Steps taken in each phase of the run, by phase name (one phase: every step)."""
        return {self.phase(): self.step}

    @abstractmethod
    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Every tensor of the run's state, and the JSON meta that goes with them."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_tensors` wrote (the counters are restored here)."""

    @abstractmethod
    def result_state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(generator config, generator state dict) of the generator the run returns."""

    @abstractmethod
    def set_train_mode(self) -> None:
        """Put the networks in training mode before the loop."""

    # ------------------------------------------------------------------------ helpers
    def autocast(self) -> AbstractContextManager[Any]:
        dtype = autocast_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    # -------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: Path, seconds: float) -> None:
        tensors, meta = self.state_tensors()
        meta = {
            **meta,
            "kind": CHECKPOINT_KIND,
            "format": CHECKPOINT_FORMAT,
            "architecture": self.cfg.architecture,
            "train_config": self.cfg.to_dict(),
            "step": self.step,
            "images_seen": self.images_seen,
            "seconds": seconds,
            "losses": self.losses(),
            "phase": self.phase(),
            "rng_numpy": self.np_rng.bit_generator.state,
            "data_fingerprint": self.fingerprint,
            "device": str(self.device),
            "precision": self.precision,
        }
        tensors = {**tensors, "rng.torch": self.torch_rng.get_state()}  # (S,) uint8
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
        self.load_state_tensors(tensors, meta)
        self.torch_rng.set_state(tensors["rng.torch"].contiguous())
        self.np_rng.bit_generator.state = meta["rng_numpy"]
        self.step = int(meta["step"])
        self.images_seen = int(meta["images_seen"])
        self.seconds_before = float(meta["seconds"])
        self.resumed = True

    def resume_from(self, path: Path) -> None:
        """Resume ``path`` when it is a checkpoint of this run; otherwise log why not (the
        file is then overwritten by this run's first checkpoint)."""
        try:
            tensors, meta = load_state(path)
            reason = self.resume_matches(meta)
        except Exception as exc:  # unreadable file: start afresh rather than fail forever
            reason = f"unreadable ({exc})"
        if reason is None:
            self.load_checkpoint(tensors, meta)
            logger.info("resuming %s at step %d", path, self.step)
        else:
            logger.warning("not resuming from %s: %s", path, reason)

    # ---------------------------------------------------------------------------- run
    def progress(self, seconds: float, run_images: int, run_seconds: float) -> TrainProgress:
        cfg = self.cfg
        etas: list[float] = []
        if cfg.max_steps is not None and run_seconds > 0 and self.step > 0:
            done = self.step - self._start_step
            if done > 0:
                etas.append(max(0, cfg.max_steps - self.step) * run_seconds / done)
        if cfg.max_seconds is not None:
            etas.append(max(0.0, cfg.max_seconds - seconds))
        return TrainProgress(
            step=self.step,
            total_steps=cfg.max_steps,
            images_seen=self.images_seen,
            seconds=seconds,
            images_per_second=run_images / run_seconds if run_seconds > 0 else 0.0,
            losses=self.losses(),
            eta_seconds=min(etas) if etas else None,
            phase=self.phase(),
        )

    def run(
        self,
        checkpoint_path: Path | None,
        on_progress: Callable[[TrainProgress], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> TrainResult:
        cfg = self.cfg
        self.set_train_mode()
        t0 = time.perf_counter()
        self._start_step = self.step
        start_images = self.images_seen
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
            self.train_step(elapsed())
            now = time.perf_counter()
            if on_progress is not None and now - last_progress >= cfg.progress_every_s:
                on_progress(self.progress(elapsed(), self.images_seen - start_images, now - t0))
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
            on_progress(self.progress(seconds, self.images_seen - start_images, run_seconds))
        generator_config, generator_state = self.result_state()
        return TrainResult(
            generator_config=generator_config,
            generator_state=to_cpu_fp32(generator_state),
            steps=self.step,
            images_seen=self.images_seen,
            seconds=seconds,
            final_losses=self.losses(),
            device=str(self.device),
            precision=self.precision,
            stopped=stopped,
            architecture=cfg.architecture,
            phase_steps=self.phase_steps(),
        )
