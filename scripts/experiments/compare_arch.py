"""Train each architecture for the same wall time on the NIH demo subset and gate its samples.

    .venv/bin/python scripts/experiments/compare_arch.py [--seconds 180] [--arch dcgan projgan]

Data: /work/shared/data/nih-cxr14-64 (rows naming exactly one of Normal, Cardiomegaly,
Effusion, Edema, Pneumothorax; patients split 80/20 with seed 0, see nih_data.py). Each
architecture is trained in turn (never two at once), then 100 images per class are sampled and
checked against the training images with the product's memorization gate (threshold: 95th
percentile of the holdout images' nearest-train correlation). Printed per architecture: the
flagged fraction per class and overall, the distance-to-closest-record train share, the number
of distinct nearest training images per class and the largest share of one class's samples
that have the same nearest training image (a collapse shows as 1 distinct / 100 %), steps and
images/s. A PNG grid (one row per class) per architecture goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nih_data import load_split

from synthray.models.memorization import check_memorization
from synthray.models.sampling import sample_images
from synthray.models.training import (
    TrainConfig,
    TrainProgress,
    load_generator,
    save_generator,
    train_gan,
)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int) -> Image.Image:
    """One row per class with its first ``per_row`` images, 2 px white gaps."""
    r = images.shape[1]
    gap = 2
    canvas = np.full(
        (num_classes * (r + gap) + gap, per_row * (r + gap) + gap), 255, dtype=np.uint8
    )
    for c in range(num_classes):
        for j, img in enumerate(images[labels == c][:per_row]):
            y, x = gap + c * (r + gap), gap + j * (r + gap)
            canvas[y : y + r, x : x + r] = img
    return Image.fromarray(canvas, mode="L")


def run_one(args: argparse.Namespace, arch: str, split: Any, overrides: dict[str, Any]) -> dict:
    kwargs: dict[str, Any] = {
        "architecture": arch,
        "class_names": split.classes,
        "batch_size": args.batch_size,
        "max_seconds": None if args.steps else args.seconds,
        "max_steps": args.steps or None,
        "seed": args.seed,
        "device": "cpu",
        "progress_every_s": 30.0,
    }
    kwargs.update(overrides)
    cfg = TrainConfig(**kwargs)

    def show(p: TrainProgress) -> None:
        print(
            f"  [{arch}] step {p.step:5d} {p.seconds:6.1f}s {p.images_per_second:6.1f} img/s "
            f"loss_d {p.loss_d:.3f} loss_g {p.loss_g:.3f}",
            flush=True,
        )

    load_before = os.getloadavg()[0]
    result = train_gan(split.train_images, split.train_labels, cfg, on_progress=show)
    load_after = os.getloadavg()[0]
    # Through the product's file format, as the sampling worker sees it.
    tag = args.tag or arch
    path = Path(args.out) / f"compare_{tag}_generator.safetensors"
    digest = save_generator(
        path, result.generator_state, result.generator_config, architecture=result.architecture
    )
    generator = load_generator(path, digest)
    c = len(split.classes)
    t0 = time.perf_counter()
    images, labels = sample_images(
        generator, dict.fromkeys(range(c), args.per_class), seed=args.seed, device="cpu"
    )
    sample_s = time.perf_counter() - t0
    report = check_memorization(
        images, split.train_images, split.holdout_images, quantile=0.95, k=1
    )
    per_class: dict[str, Any] = {}
    for k, name in enumerate(split.classes):
        mask = labels == k
        nn_idx = report.neighbours[mask, 0]
        top_share = np.bincount(nn_idx).max() / mask.sum()
        per_class[name] = {
            "flagged": float(report.flagged[mask].mean()),
            "mean_nn_corr": float(report.similarities[mask].mean()),
            "distinct_nn": len(np.unique(nn_idx)),
            "top_nn_share": float(top_share),
        }
    grid_path = Path(args.out) / f"compare_{tag}.png"
    grid(images, labels, c, args.grid_columns).save(grid_path)
    return {
        "arch": arch,
        "tag": tag,
        "config": {k: v for k, v in cfg.to_dict().items() if k != "class_names"},
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "images_per_second": round(result.images_seen / result.seconds, 1),
        "sample_images_per_second": round(len(images) / sample_s, 1),
        "threshold": round(report.threshold, 4),
        "flagged_overall": report.flagged_fraction,
        "dcr_train_share": report.dcr_train_share,
        "per_class": per_class,
        "grid": str(grid_path),
        # Another process on the 2 cores shows as a 1-minute load average well above 2.
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }


def print_report(res: dict) -> None:
    print(
        f"\n== {res['tag']}: {res['steps']} steps in {res['seconds']} s, "
        f"{res['images_per_second']} img/s (sampling {res['sample_images_per_second']} img/s)"
    )
    print(
        f"   threshold {res['threshold']}, flagged overall {res['flagged_overall']:.1%}, "
        f"dcr_train_share {res['dcr_train_share']:.2f}"
    )
    print(
        f"   {'class':14s} {'flagged':>8s} {'mean nn corr':>13s} {'distinct nn':>12s} "
        f"{'top nn share':>13s}"
    )
    for name, m in res["per_class"].items():
        print(
            f"   {name:14s} {m['flagged']:8.1%} {m['mean_nn_corr']:13.3f} "
            f"{m['distinct_nn']:12d} {m['top_nn_share']:13.0%}"
        )
    print(f"   grid: {res['grid']}, load average before/after {res['load_average']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--steps", type=int, default=0, help="train for this many steps instead")
    ap.add_argument("--arch", nargs="+", default=["dcgan", "projgan"])
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="TrainConfig overrides for every architecture (JSON values)",
    )
    ap.add_argument("--tag", default="", help="file name tag (default: the architecture)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--grid-columns", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--json", default="", help="append each result as a JSON line here")
    args = ap.parse_args()
    overrides = {k: _parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}

    split = load_split()
    counts = np.bincount(split.train_labels, minlength=len(split.classes))
    held = np.bincount(split.holdout_labels, minlength=len(split.classes))
    print("train images per class:", dict(zip(split.classes, counts.tolist(), strict=True)))
    print("holdout images per class:", dict(zip(split.classes, held.tolist(), strict=True)))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    real = grid(split.train_images, split.train_labels, len(split.classes), args.grid_columns)
    real.save(Path(args.out) / "compare_real_train.png")

    results = []
    for arch in args.arch:  # one at a time: the machine has 2 cores
        res = run_one(args, arch, split, overrides)
        print_report(res)
        results.append(res)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")

    print("\nsummary (flagged fraction per class)")
    names = split.classes
    print(
        f"{'arch':10s} "
        + " ".join(f"{n[:12]:>12s}" for n in names)
        + f" {'overall':>8s} {'dcr':>5s} {'steps':>6s} {'img/s':>6s}"
    )
    for res in results:
        row = " ".join(f"{res['per_class'][n]['flagged']:12.1%}" for n in names)
        print(
            f"{res['tag']:10s} {row} {res['flagged_overall']:8.1%} "
            f"{res['dcr_train_share']:5.2f} {res['steps']:6d} {res['images_per_second']:6.1f}"
        )


if __name__ == "__main__":
    main()
