"""Which velocity field learns most for a CPU's seconds?

On a CPU without bf16 units the latent flow's step runs at the fp32 matmul rate, and 30
minutes buy a quarter of the steps a CPU with bf16 units makes (docs/measurements.md,
"Measured: Kermany at 64 and 128 px"). This compares velocity-field settings (width, batch
size) at equal seconds of fp32 training, on one shared autoencoder, by the flow-matching loss on the
latents of held-out patients' films: the quantity the flow is trained to lower, measured
on films it never saw, at fixed noise draws, so every variant is scored on the same
questions.

    SYNTHRAY_DEV_MODE=true SYNTHRAY_DATA_DIR=var/study-.../state .venv/bin/python \\
        scripts/experiments/flow_budget.py --dataset kermany --resolution 128 \\
        --classes normal,bacteria,virus --ae-seconds 450 --flow-seconds 300 \\
        --variants "batch_size=32;batch_size=16;batch_size=32,flow_width=24"

The autoencoder trains in the CPU's own precision (bf16 where it has the units); the flow
phase of every variant runs in fp32 (as on a CPU without bf16 units; ``--flow-precision
bf16`` on a CPU with the units asks the same question there), for the same seconds, with
the product's schedule (warm-up, cool-down over the last fifth, EMA). Name ``batch_size`` in
every variant: the default differs between fp32 and bf16 at 128 and 256 px. Each variant is a
';'-separated item of comma-separated TrainConfig overrides. Prints one JSON line per
variant (loss on held-out and training latents, overall and for t <= 0.5 and t > 0.5, at
every quarter of the budget) and a JSON list at the end.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

T_GRID = 8  # flow times per held-out latent: the logit-normal's quantiles
NOISE_DRAWS = 1  # noise draws per (latent, time)


def logit_normal_quantiles(n: int) -> torch.Tensor:
    """(n,) flow times at the midpoints of n equal-probability bins of sigmoid(N(0, 1))."""
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(p)).float()


class Probe:
    """Fixed questions for a velocity field: latents, their classes, times and noise."""

    def __init__(self, latents: torch.Tensor, labels: np.ndarray, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        ts = logit_normal_quantiles(T_GRID)
        n = len(latents)
        reps = T_GRID * NOISE_DRAWS
        self.z0 = latents.repeat_interleave(reps, dim=0)  # (n * reps, C, S, S)
        self.y = torch.from_numpy(labels.astype(np.int64)).repeat_interleave(reps)
        self.t = ts.repeat_interleave(NOISE_DRAWS).repeat(n)  # (n * reps,)
        self.e = torch.randn(self.z0.shape, generator=g)

    @torch.no_grad()
    def loss(self, velocity: torch.nn.Module) -> dict[str, float]:
        """Mean squared error of v(z_t, t, y) against e - z_0: overall, t <= 0.5, t > 0.5."""
        velocity.eval()
        errs = []
        for i in range(0, len(self.z0), 512):
            z0, e = self.z0[i : i + 512], self.e[i : i + 512]
            t = self.t[i : i + 512]
            tt = t[:, None, None, None]
            zt = ((1 - tt) * z0 + tt * e).contiguous(memory_format=torch.channels_last)
            v = velocity(zt, t, self.y[i : i + 512]).float()
            errs.append((v - (e - z0)).pow(2).mean(dim=(1, 2, 3)))
        err = torch.cat(errs)
        low = self.t <= 0.5
        velocity.train()
        return {
            "all": round(float(err.mean()), 5),
            "t<=0.5": round(float(err[low].mean()), 5),
            "t>0.5": round(float(err[~low].mean()), 5),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--version", type=int, default=None, help="dataset version (latest)")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--classes", required=True, help="comma-separated class names")
    ap.add_argument("--ae-seconds", type=float, default=450.0)
    ap.add_argument("--flow-seconds", type=float, default=300.0)
    ap.add_argument("--variants", default="", help="';'-separated override lists")
    ap.add_argument("--probe-films", type=int, default=400, help="held-out films probed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flow-precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()

    from _version import load_films, parse_variant

    from synthray.models.generators.config import TrainConfig
    from synthray.models.generators.flow_trainer import FLOW, FlowTrainer
    from synthray.models.runtime import allow_cpu_bf16, keep_freed_memory, resolve_precision

    keep_freed_memory()  # as in a worker's job process

    classes = [c for c in args.classes.split(",") if c]
    films = load_films(args.dataset, args.version, args.resolution, classes)
    real, test_x, test_y = films.real, films.test_x, films.test_y
    device = torch.device("cpu")
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(len(test_x))[: args.probe_films]
    test_x, test_y = test_x[pick], test_y[pick]
    train_pick = rng.permutation(len(real.images))[: args.probe_films]

    # One autoencoder for every variant, in the CPU's own precision.
    ae_precision = resolve_precision("auto", device)
    base = TrainConfig(
        architecture="latentflow",
        resolution=args.resolution,
        class_names=classes,
        max_seconds=args.ae_seconds / 0.25,
        ae_fraction=0.25,
        precision=ae_precision,
        seed=args.seed,
    )
    ae_run = FlowTrainer(real.images, real.labels, base, device, ae_precision)
    ae_run.set_train_mode()
    start = time.perf_counter()
    while ae_run.stage != FLOW:
        ae_run.train_step(time.perf_counter() - start)
    assert ae_run.latents is not None
    mean, std = ae_run.latent_mean, ae_run.latent_std
    with torch.no_grad():
        held = []
        for i in range(0, len(test_x), 256):
            x = ae_run._as_input(test_x[i : i + 256])
            with ae_run.autocast():
                held.append(ae_run.ae.encoder(x).float())
        held_latents = (torch.cat(held) - mean) / std
    train_latents = ae_run.latents[torch.from_numpy(train_pick)]
    probes = {
        "held_out": Probe(held_latents, test_y, args.seed + 1),
        "train": Probe(train_latents, real.labels[train_pick], args.seed + 2),
    }
    print(
        json.dumps(
            {
                "autoencoder_steps": ae_run.ae_steps,
                "autoencoder_seconds": round(time.perf_counter() - start),
                "autoencoder_precision": ae_precision,
                "probe_films": len(test_x),
            }
        ),
        flush=True,
    )

    flow_precision = args.flow_precision
    if flow_precision == "fp32":
        allow_cpu_bf16(False)  # the flow phase as on a CPU without bf16 units
    elif resolve_precision("auto", device) != "bf16":
        raise SystemExit("--flow-precision bf16 needs a CPU with bf16 units")
    rows = []
    for text in args.variants.split(";") if args.variants else [""]:
        overrides = parse_variant(text)
        cfg = TrainConfig(
            architecture="latentflow",
            resolution=args.resolution,
            class_names=classes,
            max_seconds=args.flow_seconds,
            ae_fraction=0.25,
            precision=flow_precision,
            seed=args.seed,
            **overrides,  # type: ignore[arg-type]
        )
        run = FlowTrainer(real.images, real.labels, cfg, device, flow_precision)
        run.latents, run.latent_mean, run.latent_std = ae_run.latents, mean, std
        run.stage, run.ae_seconds = FLOW, 0.0
        run.set_train_mode()
        curve = []
        marks = [args.flow_seconds * q for q in (0.25, 0.5, 0.75, 1.0)]
        train_s = 0.0
        while marks:
            t0 = time.perf_counter()
            run.train_step(train_s)
            train_s += time.perf_counter() - t0
            if train_s >= marks[0]:
                marks.pop(0)
                curve.append(
                    {
                        "seconds": round(train_s),
                        "steps": run.flow_steps,
                        **{k: p.loss(run.velocity_ema) for k, p in probes.items()},
                    }
                )
        result = {
            "variant": text or "defaults",
            "precision": flow_precision,
            "flow_steps": run.flow_steps,
            "ms_per_step": round(1000 * train_s / max(run.flow_steps, 1), 1),
            "images_seen": run.images_seen,
            "final": curve[-1],
            "curve": curve,
        }
        rows.append(result)
        print(json.dumps(result), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
