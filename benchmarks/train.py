"""Training throughput and achieved FLOP/s beside the matmul peak of the same machine.

For each architecture (the DCGAN baseline and the projection GAN default) at 64 and
128 px it times real training steps of ``train_gan`` (after a warm-up), counts the
FLOPs of one step with torch's FlopCounterMode (matmuls and convolutions, forward and
backward, D and G updates), and divides. The peak is a large square matmul in fp32 and
in bf16, measured in the same run. Target: a step reaches >= 60% of the peak of the
precision it trains in.

Usage: python benchmarks/train.py [--device cuda] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from synthray.models.training import TrainConfig, resolve_precision, train_gan


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 3.0) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def step_flops(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray) -> float:
    one = TrainConfig.from_dict(cfg.to_dict() | {"max_steps": 1, "max_seconds": None})
    counter = FlopCounterMode(display=False)
    with counter:
        train_gan(images, labels, one)
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    device = torch.device(args.device)
    n = 4096 if device.type == "cuda" else 2048
    peak = {
        "fp32": matmul_peak(device, torch.float32, n),
        "bf16": matmul_peak(device, torch.bfloat16, n),
    }
    print(
        f"matmul peak on {device}: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s (threads {torch.get_num_threads()})"
    )

    rng = np.random.default_rng(0)
    rows = []
    for arch in ("dcgan", "projgan"):
        for res in (64, 128):
            images = rng.integers(0, 256, size=(512, res, res), dtype=np.uint8)
            labels = np.arange(512) % 5
            cfg = TrainConfig(
                architecture=arch,
                resolution=res,
                class_names=[f"c{i}" for i in range(5)],
                batch_size=args.batch,
                max_steps=3,
                device=args.device,
            )
            train_gan(images, labels, cfg)  # warm-up (allocator, kernels, autotuning)
            flops = step_flops(cfg, images, labels)
            timed = TrainConfig.from_dict(cfg.to_dict() | {"max_steps": args.steps})
            result = train_gan(images, labels, timed)
            steps_per_s = result.steps / result.seconds
            precision = resolve_precision(cfg.precision, device)
            achieved = flops * steps_per_s
            ref = peak["bf16" if precision in ("bf16", "fp16") else "fp32"]
            rows.append(
                {
                    "architecture": arch,
                    "resolution": res,
                    "precision": precision,
                    "images_per_s": round(steps_per_s * args.batch, 1),
                    "gflop_per_step": round(flops / 1e9, 2),
                    "achieved_gflops": round(achieved / 1e9, 1),
                    "fraction_of_peak": round(achieved / ref, 3),
                }
            )
            r = rows[-1]
            print(
                f"{arch:8} {res:>4}px {precision}: {r['images_per_s']:>7} img/s, "
                f"{r['gflop_per_step']:>7} GFLOP/step, {r['achieved_gflops']:>7} GFLOP/s, "
                f"{r['fraction_of_peak']:.0%} of peak"
            )
    default = next(r for r in rows if r["architecture"] == "projgan" and r["resolution"] == 64)
    print(
        json.dumps(
            {
                "benchmark": "train",
                "value": default["achieved_gflops"],
                "unit": "GFLOP/s (projgan 64px training step)",
                "reference": f"{default['precision']} matmul peak ({n}x{n})",
                "reference_value": round(
                    peak["bf16" if default["precision"] != "fp32" else "fp32"] / 1e9, 1
                ),
                "ratio": default["fraction_of_peak"],
                "target": 0.6,
                "device": str(device),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
