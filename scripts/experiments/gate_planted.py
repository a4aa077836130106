"""How the pixel stage's shift range moves the gate's detection of planted copies, its false
flags and its cost, on one registered generator version's dataset.

Outside the product's jobs, on the same data they use: the version's dataset split and the
copy-detection embedding its audit trained. For each shift range it calibrates the gate on
the held-out films (timed), plants ``--per-family`` altered copies of training films per
family (``synthray.models.gate.planted``, seed 0, the audit's draw) and checks them as the
audit does, then reports detection per family and the held-out films flagged in-sample.

    SYNTHRAY_DATA_DIR=var/study-.../state .venv/bin/python \
        scripts/experiments/gate_planted.py --model kermany --max-shift 4,8

Prints one JSON line per shift range.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--max-shift", default="4", help="comma list of pixel shift ranges")
    ap.add_argument("--per-family", type=int, default=20)
    args = ap.parse_args()

    from _version import load_version

    from synthray.app.db import session_factory
    from synthray.app.registry import service as registry
    from synthray.config import get_settings
    from synthray.models.gate import copydetect, planted
    from synthray.models.gate.memorization import calibrate, check_memorization

    settings = get_settings()
    v = load_version(args.model, args.version)
    split, resolution, blobs = v.split, v.resolution, v.blobs
    with session_factory(settings.sqlalchemy_url)() as s:
        enc = registry.quality_encoder(s, v.dataset_version_id, resolution, "copydetect")
        if enc is None:
            raise SystemExit("this dataset version has no copy-detection embedding yet")
        sha = enc.blob_sha256
    embedder = copydetect.load(blobs.path(sha), expected_sha256=sha, resolution=resolution)
    train, holdout = split.train_images, split.holdout_images
    copies = planted.plant(train, args.per_family, seed=0)
    print(
        f"{len(train)} training, {len(holdout)} held-out films at {resolution} px; "
        f"{len(copies.copies)} planted copies",
        flush=True,
    )
    for shift in [int(v) for v in args.max_shift.split(",")]:
        t0 = time.perf_counter()
        cal = calibrate(train, holdout, embedder=embedder, max_shift=shift)
        t_cal = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = check_memorization(
            copies.copies,
            train,
            holdout,
            quantile=settings.memorization_quantile,
            embedder=embedder,
            k=1,
            with_ssim=False,
            batch_figures=False,
            max_shift=shift,
            calibration=cal,
        )
        t_check = time.perf_counter() - t0
        found = planted.detection(rep.flagged, copies.families)
        missed = {
            name: f["planted"] - f["caught"]
            for name, f in found["per_family"].items()
            if f["caught"] < f["planted"]
        }
        by_space = {
            name: int(v.sum()) for name, v in rep.flagged_by.items()
        }  # copies each space flags
        print(
            json.dumps(
                {
                    "max_shift": shift,
                    "caught": found["caught"],
                    "planted": found["planted"],
                    "rate": found["rate"],
                    "interval_95": found["interval_95"],
                    "missed": missed,
                    "flagged_by_space": by_space,
                    "holdout_flagged": round(rep.holdout_flagged_fraction, 4),
                    "calibration_s": round(t_cal, 1),
                    "check_s": round(t_check, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
