"""Training loop of the class-conditional GANs (the budget, checkpoints and resume are
:mod:`synthray.models.generators.trainloop`'s).

Networks and loss come from :mod:`synthray.models.generators.registry`.

The algorithm is Algorithm 1 of Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014,
one discriminator update per generator update, with the Adam settings of Radford et al., ICLR
2016 (lr 2e-4, beta1 0.5). Per architecture:

- ``dcgan`` (:mod:`synthray.models.generators.dcgan`): the non-saturating loss of Goodfellow et
  al., Section 3; by default no augmentation and no EMA (the seed study's baseline).
- ``projgan`` (:mod:`synthray.models.generators.projgan`): the hinge loss of Lim and Ye,
  "Geometric GAN", 2017 (arXiv:1705.02894), as used with spectral normalisation and the
  projection discriminator by Miyato et al. 2018; by default DiffAugment (Zhao et al., NeurIPS
  2020, :mod:`synthray.models.generators.diffaugment`) on every discriminator input, and an
  exponential moving average of the generator's weights (Yazici et al., "The Unusual
  Effectiveness of Averaging in GAN Training", ICLR 2019; Karras et al. 2018), which is the
  generator the run returns.

A checkpoint holds the networks, the EMA generator, both optimizers, the RNG states, the
budget counters and the configs.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from synthray.models.checkpoint import flatten_state_dict, unflatten_state_dict
from synthray.models.generators.config import TrainConfig
from synthray.models.generators.diffaugment import diff_augment, parse_policy
from synthray.models.generators.registry import get as architecture
from synthray.models.generators.trainloop import BudgetedRun, ClassSampler, ema_decay_at
from synthray.models.runtime import to_channels_last


def adam_moments_like_params(opt: torch.optim.Optimizer) -> None:
    """Give loaded Adam moments their parameter's layout (channels-last weights)."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.dtype == p.dtype:
                    state[k] = torch.empty_like(p).copy_(v)


class GanTrainer(BudgetedRun):
    """Networks, optimizers, RNGs and counters of one GAN training run."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        cfg: TrainConfig,
        device: torch.device,
        precision: str,
    ) -> None:
        super().__init__(cfg, device, precision)
        self.gcfg = cfg.generator_config()
        self.images = images  # (N, R, R) uint8
        self.num_classes = len(cfg.class_names)
        self.batch_size = int(cfg.batch_size or 0)
        # Real batches: a class with P(c) ~ n_c ** class_power (uniformly at the default 0),
        # then an image of that class uniformly. Generated labels follow the same P(c).
        self.sampler = ClassSampler(labels, self.num_classes, float(cfg.class_power or 0.0))
        self.class_probs = self.sampler.probs

        self.arch = architecture(cfg.architecture)
        assert self.arch.gan is not None, f"{self.arch.name} is not a GAN"
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
        betas = (float(cfg.beta1 or 0.0), float(cfg.beta2 or 0.0))
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g or 0.0, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d or 0.0, betas=betas)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.loss_d: Tensor | float = math.nan
        self.loss_g: Tensor | float = math.nan

    # ----------------------------------------------------------------------------- batches
    def _to_device_images(self, x: np.ndarray) -> Tensor:
        t = torch.from_numpy(x).to(self.device, non_blocking=True)  # (B, R, R) uint8
        t = t.unsqueeze(1).float().div_(127.5).sub_(1.0)  # (B, 1, R, R) in [-1, 1]
        return t.contiguous(memory_format=torch.channels_last)

    def _real_batch(self) -> tuple[Tensor, Tensor]:
        cls = self.sampler.classes(self.batch_size, self.np_rng)  # (B,)
        idx = self.sampler.items(cls, self.np_rng)  # (B,)
        x = self._to_device_images(self.images[idx])  # (B, 1, R, R)
        y = torch.from_numpy(cls.astype(np.int64)).to(self.device)  # (B,)
        return x, y

    def _noise(self) -> tuple[Tensor, Tensor]:
        z = torch.randn(self.batch_size, self.gcfg.z_dim, generator=self.torch_rng)  # (B, z)
        y = self.sampler.labels(self.batch_size, self.torch_rng)  # (B,)
        return z.to(self.device), y.to(self.device)

    def _augment(self, x: Tensor) -> Tensor:
        """DiffAugment of a discriminator input (identity when the policy is empty)."""
        if not self.augment_policy:
            return x
        return diff_augment(x, self.augment_policy, self.torch_rng)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """G_ema <- d G_ema + (1 - d) G (:func:`ema_decay_at`). Buffers (batch-norm running
        statistics) are copied."""
        if self.G_ema is None:
            return
        decay = ema_decay_at(self.step, self.ema_decay)
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
    def set_train_mode(self) -> None:
        self.G.train()
        self.D.train()

    def train_step(self, elapsed: float) -> None:
        x, y_real = self._real_batch()  # (B, 1, R, R), (B,)
        z, y_fake = self._noise()  # (B, z_dim), (B,)
        assert self.arch.gan is not None
        loss = self.arch.gan.loss  # see synthray.models.generators.losses

        # Update D on real images and detached generated ones, each through a fresh DiffAugment
        # draw T (identity when augmentation is off): non-saturating, maximise
        # log D(T(x)|y) + log(1 - D(T(G(z|y'))|y')); hinge, minimise
        # E[max(0, 1 - D(T(x)|y))] + E[max(0, 1 + D(T(G(z|y'))|y'))].
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
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
            with self.autocast():
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
        self.images_seen += self.batch_size
        self._update_ema()

    def losses(self) -> dict[str, float]:
        return {"d": float(self.loss_d), "g": float(self.loss_g)}

    # ------------------------------------------------------------------------- checkpoints
    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        tensors.update({f"G.{k}": v for k, v in self.G.state_dict().items()})
        tensors.update({f"D.{k}": v for k, v in self.D.state_dict().items()})
        if self.G_ema is not None:
            tensors.update({f"G_ema.{k}": v for k, v in self.G_ema.state_dict().items()})
        opt_g_tensors, opt_g_structure = flatten_state_dict(self.opt_g.state_dict(), "opt_g.")
        opt_d_tensors, opt_d_structure = flatten_state_dict(self.opt_d.state_dict(), "opt_d.")
        tensors.update(opt_g_tensors)
        tensors.update(opt_d_tensors)
        meta: dict[str, Any] = {
            "generator_config": self.gcfg.to_dict(),
            "opt_g": opt_g_structure,
            "opt_d": opt_d_structure,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        def sub(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.G.load_state_dict(sub("G."))
        self.D.load_state_dict(sub("D."))
        if self.G_ema is not None:
            self.G_ema.load_state_dict(sub("G_ema."))
        self.opt_g.load_state_dict(unflatten_state_dict(tensors, meta["opt_g"]))
        self.opt_d.load_state_dict(unflatten_state_dict(tensors, meta["opt_d"]))
        for opt in (self.opt_g, self.opt_d):
            adam_moments_like_params(opt)
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        losses = meta.get("losses") or {}
        self.loss_d = float(losses.get("d", math.nan))
        self.loss_g = float(losses.get("g", math.nan))

    def result_state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        final_g = self.G_ema if self.G_ema is not None else self.G
        return self.gcfg.to_dict(), final_g.state_dict()


def generator_state_from_checkpoint(
    tensors: dict[str, Tensor], meta: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """(generator config, state) that a GAN checkpoint holds: its EMA copy when it keeps one."""
    prefix = "G_ema." if any(k.startswith("G_ema.") for k in tensors) else "G."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return meta["generator_config"], state
