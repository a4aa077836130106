"""Training loop of the latent flow generator (:mod:`synthray.models.generators.latentflow`):
first the site autoencoder, then the velocity field on its latents, in one budgeted run
(budget, checkpoints and resume are :mod:`synthray.models.generators.trainloop`'s).

Phase 1, ``autoencoder``, for ``ae_fraction`` of the budget (of ``max_steps``, or of
``max_seconds``): minimise ||D(E(x) + s n) - x||_1 + 1e-4 ||E(x)||^2 with n ~ N(0, I) and
s = ``LATENT_NOISE`` over batches of real images drawn uniformly; AdamW (beta 0.9, 0.99),
a 50-step warm-up, then cosine decay to zero over the phase. With ``ae_crop``, each image of
a batch is a random crop of that side (offsets on the latent grid) until the last quarter of
the phase, which is on whole images: the networks are fully convolutional, and a crop costs
(crop / R)^2 of a whole image.

At the switch, every training image is encoded once (no noise); the latents are
standardised per channel (mean and standard deviation kept in the generator) and stay fixed.

Phase 2, ``flow``: conditional flow matching. Draw a class with P(c) ~ n_c ** class_power and
one of its latents z_0, t = sigmoid(u) with u ~ N(0, 1) (logit-normal), e ~ N(0, I), and
minimise ||v(z_t, t, y) - (e - z_0)||^2 at z_t = (1 - t) z_0 + t e; the label is replaced by
"no class" with probability ``label_dropout`` (classifier-free guidance). AdamW with a
100-step warm-up, then a constant rate; the returned velocity field is the exponential
moving average of the trained one (decay ``ema_decay``).

A checkpoint holds both networks, the EMA copy, the current phase's optimizer, the latents
(after the switch), the RNG states and the counters.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from synthray.models.checkpoint import flatten_state_dict, unflatten_state_dict
from synthray.models.generators.autoencoder import Autoencoder
from synthray.models.generators.config import TrainConfig
from synthray.models.generators.gan_trainer import adam_moments_like_params
from synthray.models.generators.latentflow import (
    LatentFlowConfig,
    VelocityNet,
    build_seeded,
)
from synthray.models.generators.trainloop import BudgetedRun, ClassSampler, ema_decay_at
from synthray.models.runtime import to_channels_last

AUTOENCODER, FLOW = "autoencoder", "flow"
LATENT_NOISE = 0.1
LATENT_PENALTY = 1e-4
AE_WARMUP, FLOW_WARMUP = 50, 100
FULL_IMAGE_TAIL = 0.25  # share of the autoencoder phase on whole images when cropping
ENCODE_BATCH = 256


class FlowTrainer(BudgetedRun):
    """The autoencoder, the velocity field, their optimizers and the latents of one run."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        cfg: TrainConfig,
        device: torch.device,
        precision: str,
    ) -> None:
        super().__init__(cfg, device, precision)
        gcfg = cfg.generator_config()
        assert isinstance(gcfg, LatentFlowConfig)
        self.gcfg = gcfg
        self.images = images  # (N, R, R) uint8
        self.num_classes = len(cfg.class_names)
        self.sampler = ClassSampler(labels, self.num_classes, float(cfg.class_power or 0.0))
        ae_cfg = gcfg.autoencoder()
        self.ae = build_seeded(lambda: Autoencoder(ae_cfg), self.torch_rng).to(device)
        self.velocity = build_seeded(lambda: VelocityNet(gcfg), self.torch_rng).to(device)
        to_channels_last(self.ae)
        to_channels_last(self.velocity)
        self.ema_decay = float(cfg.ema_decay or 0.0)
        self.velocity_ema = copy.deepcopy(self.velocity).requires_grad_(False)
        betas = (0.9, 0.99)
        self.opt_ae = torch.optim.AdamW(
            self.ae.parameters(), lr=float(cfg.lr_ae or 0.0), betas=betas, weight_decay=0.0
        )
        self.opt_flow = torch.optim.AdamW(
            self.velocity.parameters(), lr=float(cfg.lr_flow or 0.0), betas=betas, weight_decay=0.0
        )
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.stage = AUTOENCODER
        self.ae_steps = 0
        self.flow_steps = 0
        self.ae_seconds = 0.0  # training time at the switch to the flow phase
        self.latents: Tensor | None = None  # (N, C, S, S) standardised, on the device
        self.latent_mean = torch.zeros(1, gcfg.latent_channels, 1, 1)
        self.latent_std = torch.ones(1, gcfg.latent_channels, 1, 1)
        self.loss: float = math.nan

    # ------------------------------------------------------------------------- budget
    def _ae_step_budget(self) -> int | None:
        if self.cfg.max_steps is None:
            return None
        return round(float(self.cfg.ae_fraction or 0.0) * self.cfg.max_steps)

    def _ae_second_budget(self) -> float | None:
        if self.cfg.max_seconds is None:
            return None
        return float(self.cfg.ae_fraction or 0.0) * self.cfg.max_seconds

    def _ae_done(self, elapsed: float) -> bool:
        steps, seconds = self._ae_step_budget(), self._ae_second_budget()
        return (steps is not None and self.ae_steps >= steps) or (
            seconds is not None and elapsed >= seconds
        )

    def _ae_progress(self, elapsed: float) -> float:
        """Share of the autoencoder phase used, in [0, 1]."""
        shares = [0.0]
        steps, seconds = self._ae_step_budget(), self._ae_second_budget()
        if steps:
            shares.append(self.ae_steps / steps)
        if seconds:
            shares.append(elapsed / seconds)
        return min(1.0, max(shares))

    def _flow_progress(self, elapsed: float) -> float:
        """Share of the flow phase used, in [0, 1] (the budget left after the autoencoder)."""
        shares = [0.0]
        if self.cfg.max_steps is not None:
            total = self.cfg.max_steps - (self._ae_step_budget() or 0)
            if total > 0:
                shares.append(self.flow_steps / total)
        if self.cfg.max_seconds is not None:
            total_s = self.cfg.max_seconds - self.ae_seconds
            if total_s > 0:
                shares.append((elapsed - self.ae_seconds) / total_s)
        return min(1.0, max(shares))

    def _flow_lr(self, elapsed: float) -> float:
        """Warm-up, then constant, then (``flow_cooldown``) linear decay to 0 at the end."""
        lr = float(self.cfg.lr_flow or 0.0) * min(1.0, (self.flow_steps + 1) / FLOW_WARMUP)
        cooldown = float(self.cfg.flow_cooldown or 0.0)
        if cooldown > 0:
            lr *= min(1.0, (1.0 - self._flow_progress(elapsed)) / cooldown)
        return lr

    # -------------------------------------------------------------------------- steps
    def _images(self, idx: np.ndarray) -> Tensor:
        return self._as_input(self.images[idx])

    def _as_input(self, images: np.ndarray) -> Tensor:
        """uint8 (B, H, W) -> (B, 1, H, W) in [-1, 1] on the device, channels-last."""
        t = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        t = t.unsqueeze(1).float().div_(127.5).sub_(1.0)
        return t.contiguous(memory_format=torch.channels_last)

    def _ae_crop_now(self, elapsed: float) -> int:
        """The crop side for this autoencoder step, or 0 for whole images: crops until the
        last ``FULL_IMAGE_TAIL`` of the phase, so that the group norms of the lower levels
        end up trained on whole images' statistics, as they are used."""
        crop = int(self.cfg.ae_crop or 0)
        if not 0 < crop < self.cfg.resolution:
            return 0
        return crop if self._ae_progress(elapsed) < 1.0 - FULL_IMAGE_TAIL else 0

    def _crops(self, idx: np.ndarray, crop: int) -> Tensor:
        """One random crop of side ``crop`` per image, at offsets on the latent grid."""
        stride = self.gcfg.resolution // self.gcfg.latent_size
        positions = (self.gcfg.resolution - crop) // stride + 1
        oy, ox = self.np_rng.integers(0, positions, size=(2, len(idx))) * stride
        batch = np.stack(
            [
                self.images[i, y : y + crop, x : x + crop]
                for i, y, x in zip(idx, oy, ox, strict=True)
            ]
        )  # (B, crop, crop)
        return self._as_input(batch)

    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.torch_rng).to(self.device)

    def _backward_step(self, loss: Tensor, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            opt.step()

    def _autoencoder_step(self, elapsed: float) -> None:
        b = int(self.cfg.ae_batch_size or 0)
        lr = float(self.cfg.lr_ae or 0.0) * min(1.0, (self.ae_steps + 1) / AE_WARMUP)
        lr *= 0.5 * (1.0 + math.cos(math.pi * self._ae_progress(elapsed)))
        for group in self.opt_ae.param_groups:
            group["lr"] = lr
        idx = self.np_rng.integers(0, len(self.images), size=b)  # (B,) uniform over images
        crop = self._ae_crop_now(elapsed)
        x = self._crops(idx, crop) if crop else self._images(idx)  # (B, 1, H, H)
        side = x.shape[-1] * self.gcfg.latent_size // self.gcfg.resolution
        noise = self._randn(b, self.gcfg.latent_channels, side, side)
        # Minimise ||D(E(x) + s n) - x||_1 + 1e-4 ||E(x)||^2.
        with self.autocast():
            z = self.ae.encoder(x)  # (B, C, S, S)
            recon = self.ae.decoder(z + LATENT_NOISE * noise.to(z.dtype))  # (B, 1, R, R)
        loss = (recon.float() - x).abs().mean() + LATENT_PENALTY * z.float().pow(2).mean()
        self._backward_step(loss, self.opt_ae)
        self.loss = float(loss.detach())
        self.ae_steps += 1
        self.images_seen += b

    @torch.no_grad()
    def start_flow(self, elapsed: float) -> None:
        """Encode every training image once and standardise the latents per channel."""
        self.ae.eval()
        parts = []
        for start in range(0, len(self.images), ENCODE_BATCH):
            idx = np.arange(start, min(start + ENCODE_BATCH, len(self.images)))
            with self.autocast():
                parts.append(self.ae.encoder(self._images(idx)).float())  # (b, C, S, S)
        z = torch.cat(parts)  # (N, C, S, S)
        self.latent_mean = z.mean(dim=(0, 2, 3), keepdim=True).cpu()  # (1, C, 1, 1)
        self.latent_std = z.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6).cpu()
        self.latents = (z - self.latent_mean.to(z.device)) / self.latent_std.to(z.device)
        self.latents = self.latents.contiguous()
        self.stage = FLOW
        self.ae_seconds = elapsed
        self.opt_ae.state.clear()  # not needed any more; keeps checkpoints small

    def _flow_step(self, elapsed: float) -> None:
        assert self.latents is not None
        b = int(self.cfg.batch_size or 0)
        lr = self._flow_lr(elapsed)
        for group in self.opt_flow.param_groups:
            group["lr"] = lr
        cls = self.sampler.classes(b, self.np_rng)  # (B,)
        idx = torch.from_numpy(self.sampler.items(cls, self.np_rng))  # (B,)
        z0 = self.latents[idx.to(self.latents.device)]  # (B, C, S, S)
        y = torch.from_numpy(cls.astype(np.int64))  # (B,)
        drop = torch.rand(b, generator=self.torch_rng) < float(self.cfg.label_dropout or 0.0)
        y = torch.where(drop, torch.full_like(y, self.num_classes), y).to(self.device)
        t = torch.sigmoid(torch.randn(b, generator=self.torch_rng)).to(self.device)  # (B,)
        e = self._randn(*z0.shape)  # (B, C, S, S)
        tt = t[:, None, None, None]
        zt = ((1.0 - tt) * z0 + tt * e).contiguous(memory_format=torch.channels_last)
        # Minimise ||v(z_t, t, y) - (e - z_0)||^2: the straight path's velocity.
        with self.autocast():
            v = self.velocity(zt, t, y)  # (B, C, S, S)
        loss = F.mse_loss(v.float(), e - z0)
        self._backward_step(loss, self.opt_flow)
        self.loss = float(loss.detach())
        self.flow_steps += 1
        self.images_seen += b
        self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = ema_decay_at(self.flow_steps, self.ema_decay)
        for p_ema, p in zip(
            self.velocity_ema.parameters(), self.velocity.parameters(), strict=True
        ):
            p_ema.lerp_(p.detach(), 1.0 - decay)

    def set_train_mode(self) -> None:
        self.ae.train(self.stage == AUTOENCODER)
        self.velocity.train()

    def train_step(self, elapsed: float) -> None:
        if self.stage == AUTOENCODER and self._ae_done(elapsed):
            self.start_flow(elapsed)
        if self.stage == AUTOENCODER:
            self._autoencoder_step(elapsed)
        else:
            self._flow_step(elapsed)
        self.step += 1

    def phase(self) -> str:
        return self.stage

    def phase_steps(self) -> dict[str, int]:
        return {AUTOENCODER: self.ae_steps, FLOW: self.flow_steps}

    def losses(self) -> dict[str, float]:
        name = "reconstruction" if self.stage == AUTOENCODER else "flow"
        return {name: self.loss}

    # -------------------------------------------------------------------- checkpoints
    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        tensors.update({f"ae.{k}": v for k, v in self.ae.state_dict().items()})
        tensors.update({f"velocity.{k}": v for k, v in self.velocity.state_dict().items()})
        tensors.update({f"velocity_ema.{k}": v for k, v in self.velocity_ema.state_dict().items()})
        opt_ae, opt_ae_structure = flatten_state_dict(self.opt_ae.state_dict(), "opt_ae.")
        opt_flow, opt_flow_structure = flatten_state_dict(self.opt_flow.state_dict(), "opt_flow.")
        tensors.update(opt_ae)
        tensors.update(opt_flow)
        tensors["latent_mean"] = self.latent_mean
        tensors["latent_std"] = self.latent_std
        if self.latents is not None:
            tensors["latents"] = self.latents
        meta: dict[str, Any] = {
            "generator_config": self.gcfg.to_dict(),
            "stage": self.stage,
            "ae_steps": self.ae_steps,
            "flow_steps": self.flow_steps,
            "ae_seconds": self.ae_seconds,
            "opt_ae": opt_ae_structure,
            "opt_flow": opt_flow_structure,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        def sub(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.ae.load_state_dict(sub("ae."))
        self.velocity.load_state_dict(sub("velocity."))
        self.velocity_ema.load_state_dict(sub("velocity_ema."))
        self.opt_ae.load_state_dict(unflatten_state_dict(tensors, meta["opt_ae"]))
        self.opt_flow.load_state_dict(unflatten_state_dict(tensors, meta["opt_flow"]))
        for opt in (self.opt_ae, self.opt_flow):
            adam_moments_like_params(opt)
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.latent_mean = tensors["latent_mean"].clone()
        self.latent_std = tensors["latent_std"].clone()
        self.latents = tensors["latents"].to(self.device) if "latents" in tensors else None
        self.stage = str(meta["stage"])
        self.ae_steps = int(meta["ae_steps"])
        self.flow_steps = int(meta["flow_steps"])
        self.ae_seconds = float(meta["ae_seconds"])
        losses = meta.get("losses") or {}
        self.loss = float(next(iter(losses.values()), math.nan))

    def result_state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        velocity: nn.Module = self.velocity_ema if self.ema_decay > 0 else self.velocity
        return self.gcfg.to_dict(), generator_state(
            velocity.state_dict(), self.ae.decoder.state_dict(), self.latent_mean, self.latent_std
        )


def generator_state(
    velocity: dict[str, Tensor],
    decoder: dict[str, Tensor],
    latent_mean: Tensor,
    latent_std: Tensor,
) -> dict[str, Tensor]:
    """The state dict of a :class:`~synthray.models.generators.latentflow.Generator`."""
    state = {f"velocity.{k}": v for k, v in velocity.items()}
    state.update({f"decoder.{k}": v for k, v in decoder.items()})
    state["latent_mean"] = latent_mean
    state["latent_std"] = latent_std
    return state


def generator_state_from_checkpoint(
    tensors: dict[str, Tensor], meta: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """(generator config, state) a checkpoint holds, or None while the autoencoder trains
    (there is no generator to sample yet)."""
    if meta.get("stage") != FLOW:
        return None

    def sub(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    ema = float(meta["train_config"].get("ema_decay") or 0.0) > 0
    state = generator_state(
        sub("velocity_ema." if ema else "velocity."),
        sub("ae.decoder."),
        tensors["latent_mean"],
        tensors["latent_std"],
    )
    return meta["generator_config"], state
