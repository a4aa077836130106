"""``train_generator``: train any registered architecture with the loop of its family.

Each family of :mod:`synthray.models.generators.registry` has one trainer class (a
:class:`~synthray.models.generators.trainloop.BudgetedRun`) and one function that finds the
generator inside one of its checkpoints (for previews while it trains).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from synthray.models.generators import flow_trainer, gan_trainer
from synthray.models.generators.config import (
    TrainConfig,
    TrainProgress,
    TrainResult,
    validate_data,
)
from synthray.models.generators.registry import GAN, LATENT_FLOW
from synthray.models.generators.registry import get as architecture
from synthray.models.generators.trainloop import BudgetedRun, data_fingerprint
from synthray.models.runtime import resolve_device, resolve_precision


@dataclass(frozen=True)
class Family:
    trainer: Callable[[np.ndarray, np.ndarray, TrainConfig, torch.device, str], BudgetedRun]
    generator_in_checkpoint: Callable[
        [dict[str, Tensor], dict[str, Any]], tuple[dict[str, Any], dict[str, Tensor]] | None
    ]


TRAINERS: dict[str, Family] = {
    GAN: Family(gan_trainer.GanTrainer, gan_trainer.generator_state_from_checkpoint),
    LATENT_FLOW: Family(flow_trainer.FlowTrainer, flow_trainer.generator_state_from_checkpoint),
}


def family_of(architecture_name: str) -> Family:
    return TRAINERS[architecture(architecture_name).family]


def train_generator(
    images: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    *,
    checkpoint_path: Path | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a class-conditional generator on ``images`` (uint8 (N, R, R)) and ``labels``.

    Class draws follow P(c) ~ n_c ** ``cfg.class_power``. Images are never flipped (chest
    radiographs are not left-right symmetric). Stops at ``cfg.max_steps`` or once
    ``cfg.max_seconds`` of training time is used, whichever comes first, or with
    ``stopped="cancelled"`` when ``should_stop()`` (asked before every step) returns True.

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
    trainer = family_of(cfg.architecture).trainer(images, labels, cfg, device, precision)
    if checkpoint_path is not None:
        checkpoint_path = Path(checkpoint_path)
        trainer.fingerprint = data_fingerprint(images, labels)
        if checkpoint_path.exists():
            trainer.resume_from(checkpoint_path)
    return trainer.run(checkpoint_path, on_progress, should_stop)
