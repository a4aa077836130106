"""The whole memorization gate on a realistic size: a 1,000-image batch against the
Kermany training set (5,216 real radiographs, 64 px; ``--resolution 128`` for 128 px, with
the pixel shift search scaled as the jobs scale it), with the bare exact 1-NN search
(faiss IndexFlatIP on the same pixel vectors) as the reference in the same run.

The value is the check of the first batch after the calibration, as the batch-check job
runs it (a second batch is timed beside it: it reuses the training-side searches of the
authenticity figure that the first one made): the robust pixel
scoring (shifts, mirror, rescale) and SSIM of every candidate, the embedding search, the
registration and the batch figures. What the product does once per dataset version is
timed and stated beside it: the copy-detection embedding's training (its budget is
--copydetect-seconds) and the calibration on the held-out patients' films (stored and
reused by every later check, see synthray.models.gate.calibration).
Usage: python benchmarks/gate.py [--batch 1000] [--copydetect-seconds 30] [--resolution 64]

On a CPU with bf16 units, the figures of one without them (fp32 everywhere, AVX2 kernels in
torch, oneDNN, MKL, faiss and OpenBLAS) come from the same script run as
``SYNTHRAY_CPU_BF16=off ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2 FAISS_OPT_LEVEL=avx2 OPENBLAS_CORETYPE=Haswell``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load_kermany(folder: Path, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    with (folder / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    images = []
    for r in rows:
        with Image.open(folder / r["file"]) as im:
            im.draft("L", (size * 2, size * 2))  # JPEG: decode at reduced scale
            small = im.convert("L").resize((size, size), Image.Resampling.BILINEAR)
            images.append(np.asarray(small))
    return np.stack(images), np.array([r["patient_key"] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/kermany-224")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--copydetect-seconds", type=float, default=30.0)
    ap.add_argument("--resolution", type=int, default=64, choices=(64, 128))
    args = ap.parse_args()

    import faiss
    import torch

    from synthray.models.gate import copydetect
    from synthray.models.gate.memorization import (
        calibrate,
        check_memorization,
        pixel_features,
        pixel_shift_range,
    )
    from synthray.models.runtime import cpu_bf16_fast, keep_freed_memory

    keep_freed_memory()  # as in the worker's job processes, where the check runs
    bf16 = "yes" if cpu_bf16_fast() else "no (fp32)"
    print(f"bf16: {bf16}; torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    res = args.resolution
    shift = pixel_shift_range(res)
    images, patients = load_kermany(args.data, res)
    print(f"loaded {len(images)} Kermany images at {res} px in {time.perf_counter() - t0:.0f} s")
    rng = np.random.default_rng(0)
    uniq = np.unique(patients)
    held = set(rng.choice(uniq, size=len(uniq) // 10, replace=False).tolist())
    is_hold = np.array([p in held for p in patients])
    train, holdout = images[~is_hold], images[is_hold]

    # A synthetic-like batch: blends of three training images plus noise (not copies).
    def blends() -> np.ndarray:
        idx = rng.integers(0, len(train), size=(args.batch, 3))
        mix = train[idx].astype(np.float32).mean(1) + rng.normal(0, 8, (args.batch, res, res))
        return np.clip(mix, 0, 255).astype(np.uint8)

    batch, second = blends(), blends()

    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(res * res)
    index.add(pixel_features(train))
    index.search(pixel_features(batch), 1)
    ref_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = copydetect.CopyDetectConfig(resolution=res, max_seconds=args.copydetect_seconds)
    embedder = copydetect.train(train, patients[~is_hold], cfg).model
    t_embed = time.perf_counter() - t0
    t1 = time.perf_counter()
    calibration = calibrate(train, holdout, embedder=embedder, max_shift=shift)
    t_cal = time.perf_counter() - t1
    t1 = time.perf_counter()

    def check(images: np.ndarray) -> Any:
        return check_memorization(
            images, train, holdout, embedder=embedder, k=3, max_shift=shift, calibration=calibration
        )

    rep = check(batch)
    t_check = time.perf_counter() - t1
    # A second batch reuses the training-side searches the first one added (authenticity).
    t1 = time.perf_counter()
    check(second)
    t_second = time.perf_counter() - t1
    print(f"train {len(train)}, held-out {len(holdout)}, batch {len(batch)}")
    print(f"bare faiss IndexFlatIP 1-NN (pixels): {ref_s:.2f} s")
    print(
        f"gate, once per dataset version: embedding training {t_embed:.1f} s, calibration on "
        f"the held-out films {t_cal:.1f} s; per batch: check {t_check:.1f} s (a second "
        f"batch {t_second:.1f} s); flagged {rep.flagged.mean():.1%}, held-out flagged "
        f"{rep.holdout_flagged_fraction:.1%}"
    )
    print(
        json.dumps(
            {
                "benchmark": "gate",
                "value": round(t_check, 2),
                "unit": f"s for a {len(batch)}-image batch vs Kermany at {res} px (calibrated)",
                "reference": "faiss IndexFlatIP 1-NN on the same pixel vectors",
                "reference_value": round(ref_s, 2),
                "ratio": round(t_check / ref_s, 2),
                "target": 30.0,
                "embedding_training_s": round(t_embed, 1),
                "calibration_s": round(t_cal, 1),
                "second_batch_s": round(t_second, 2),
                "flagged_fraction": round(float(rep.flagged.mean()), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
