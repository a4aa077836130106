"""Per-class sharpness of a generator's images beside the real training films of each class.

Outside the product's jobs, on the version's own training films (as the evaluation selects
them). Two measures per film, medians per class: the variance of its Laplacian, and the
standard deviation of its high-pass part (the film minus its Gaussian blur, sigma 2 px),
plus the mean grey-level contrast. A generator whose images of one class are much smoother
than the real films of that class hands a classifier trained on them a shortcut (blur)
that real films do not have.

    SYNTHRAY_DATA_DIR=var/study-.../state .venv/bin/python \
        scripts/experiments/sharpness.py --model kermany --steps 8,24

Prints one JSON line per class and source.
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import torch
from scipy import ndimage


def sharpness(images: np.ndarray) -> dict[str, float]:
    x = images.astype(np.float32)
    lap = [float(ndimage.laplace(i).var()) for i in x]
    high = [float((i - ndimage.gaussian_filter(i, 2)).std()) for i in x]
    return {
        "laplacian_var": round(float(np.median(lap)), 1),
        "high_pass_std": round(float(np.median(high)), 2),
        "contrast": round(float(x.std(axis=(1, 2)).mean()), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--steps", default="8", help="comma list of Heun steps")
    ap.add_argument("--per-class", type=int, default=150)
    args = ap.parse_args()

    from _version import load_version

    from synthray.models.generators.files import load_generator
    from synthray.models.generators.sampling import sample_images

    v = load_version(args.model, args.version)
    classes, real = v.classes, v.real
    generator = load_generator(v.weights, expected_sha256=v.weights_sha256)
    for c, name in enumerate(classes):
        films = real.images[real.labels == c][: 2 * args.per_class]
        print(json.dumps({"class": name, "source": "real", **sharpness(films)}), flush=True)
    for steps in [int(v) for v in args.steps.split(",")]:
        g = copy.deepcopy(generator)
        g.cfg.sample_steps = steps
        x, y = sample_images(g, dict.fromkeys(range(len(classes)), args.per_class), seed=0)
        for c, name in enumerate(classes):
            row_out = {"class": name, "source": f"generated, {steps} steps", **sharpness(x[y == c])}
            print(json.dumps(row_out), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
