"""Quality of each architecture at equal training time on a reference set (README table).

    .venv/bin/python scripts/experiments/quality_table.py --set kermany [--seconds 180]

Sets (from SYNTHRAY_TEST_DATA, default ../shared/data):
  nih      NIH ChestX-ray14 64 px, the five classes of the seed study (rows naming exactly one
           of Normal, Cardiomegaly, Effusion, Edema, Pneumothorax);
  kermany  Kermany paediatric radiographs (train folder) read at 64 px, classes
           normal / bacteria / virus (the ``subtype`` column).
Patients are split 80/20 with seed 0. The quality encoder (synthray.models.evaluation.quality)
is trained once on the training split with the product's default budget; each architecture then
trains for ``--seconds`` of wall time (never two at once), samples ``--per-class`` images per
class, and gets the product's metrics (FID, KID, k-NN precision and recall, beside the real
held-out floor) and the product's memorization gate in pixel space (95th percentile of the
held-out patients' nearest-train correlation). One JSON line per architecture, then a Markdown
table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from synthray.models.evaluation import quality
from synthray.models.gan.config import TrainConfig
from synthray.models.gan.files import load_generator, save_generator
from synthray.models.gan.sampling import sample_images
from synthray.models.gan.trainer import train_gan
from synthray.models.gate.memorization import check_memorization

DATA = Path(
    os.environ.get("SYNTHRAY_TEST_DATA", Path(__file__).resolve().parents[2] / "../shared/data")
)


CLASSES = ["Normal", "Cardiomegaly", "Effusion", "Edema", "Pneumothorax"]


@dataclass
class Split:
    classes: list[str]
    train_images: np.ndarray  # (N, R, R) uint8
    train_labels: np.ndarray  # (N,) int64
    holdout_images: np.ndarray  # (H, R, R) uint8
    holdout_labels: np.ndarray  # (H,) int64


def load_split(folder: Path, holdout_fraction: float = 0.2, seed: int = 0) -> Split:
    """Rows whose ``Finding Labels`` name exactly one of CLASSES ("No Finding" is Normal).

    Patients (``Patient ID``) are shuffled with ``np.random.default_rng(seed)`` and the first
    ``round(holdout_fraction * P)`` are held out, so no patient is in both parts.
    """
    images: list[np.ndarray] = []
    labels: list[int] = []
    patients: list[str] = []
    with (folder / "labels.csv").open(newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            found = {
                "Normal" if p.strip() == "No Finding" else p.strip()
                for p in row["Finding Labels"].split("|")
            }
            hits = [c for c in CLASSES if c in found]
            if len(hits) != 1:
                continue
            with Image.open(folder / row["file"]) as im:
                images.append(np.asarray(im.convert("L"), dtype=np.uint8))
            labels.append(CLASSES.index(hits[0]))
            patients.append(row["Patient ID"].strip())
    unique = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(unique))
    held = {unique[i] for i in order[: max(1, round(holdout_fraction * len(unique)))]}
    is_holdout = np.array([p in held for p in patients])
    x = np.stack(images)  # (N, R, R)
    y = np.array(labels, dtype=np.int64)  # (N,)
    return Split(CLASSES, x[~is_holdout], y[~is_holdout], x[is_holdout], y[is_holdout])


def _read_grey(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im.draft("L", (size, size))  # JPEG decodes at reduced scale
        g = im.convert("L")
        if g.size != (size, size):
            g = g.resize((size, size), Image.BILINEAR)
        return np.asarray(g, dtype=np.uint8)


def load(name: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(classes, train images (N, 64, 64) uint8, train labels, held-out images, labels)."""
    if name == "nih":
        split = load_split(DATA / "nih-cxr14-64")  # the same 80/20 patient split, seed 0
        return (
            split.classes,
            split.train_images,
            split.train_labels,
            split.holdout_images,
            split.holdout_labels,
        )
    folder, classes = DATA / "kermany-224", ["normal", "bacteria", "virus"]
    images, labels, patients = [], [], []
    with (folder / "labels.csv").open(newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            images.append(_read_grey(folder / row["file"], 64))
            labels.append(classes.index(row["subtype"].strip().lower()))
            patients.append(row["patient_key"])
    x, y, p = np.stack(images), np.array(labels), np.array(patients)
    unique = np.array(sorted(set(p.tolist())))
    order = np.random.default_rng(0).permutation(len(unique))
    held_p = set(unique[order[: round(0.2 * len(unique))]].tolist())
    held = np.array([k in held_p for k in p])
    return classes, x[~held], y[~held], x[held], y[held]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--set", choices=("nih", "kermany"), default="kermany")
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--arch", nargs="+", default=["dcgan", "projgan"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    classes, tr_x, tr_y, ho_x, ho_y = load(args.set)
    counts = np.bincount(tr_y, minlength=len(classes)).tolist()
    print(
        f"{args.set}: train {len(tr_x)} {dict(zip(classes, counts, strict=True))}, "
        f"held out {len(ho_x)}"
    )

    t = time.perf_counter()
    enc = quality.train_encoder(
        tr_x, tr_y, quality.EncoderConfig(resolution=64, num_classes=len(classes))
    )
    print(
        f"encoder: {time.perf_counter() - t:.0f} s, "
        f"held-out accuracy {quality.accuracy(enc, ho_x, ho_y):.2f}"
    )

    rows = []
    for arch in args.arch:
        cfg = TrainConfig(
            architecture=arch,
            resolution=64,
            class_names=classes,
            max_seconds=args.seconds,
            max_steps=None,
            seed=args.seed,
        )
        result = train_gan(tr_x, tr_y, cfg)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "generator.safetensors"
            save_generator(path, result.generator_state, result.generator_config, architecture=arch)
            generator = load_generator(path, None)
        fake_x, fake_y = sample_images(
            generator, dict.fromkeys(range(len(classes)), args.per_class), seed=12345, device="cpu"
        )
        m = quality.evaluate(enc, tr_x, tr_y, ho_x, ho_y, fake_x, fake_y, classes)
        gate = check_memorization(fake_x, tr_x, ho_x, quantile=0.95, k=1, with_ssim=False)
        per_class_flag = {c: float(gate.flagged[fake_y == k].mean()) for k, c in enumerate(classes)}
        row = {
            "set": args.set,
            "architecture": arch,
            "seconds": args.seconds,
            "steps": result.steps,
            "images_per_s": round(result.steps * cfg.batch_size / result.seconds, 1),
            "metrics": m,
            "flagged": round(float(gate.flagged.mean()), 4),
            "flagged_per_class": per_class_flag,
            "dcr_train_share": round(gate.dcr_train_share, 3),
        }
        rows.append(row)
        print(json.dumps(row))

    print(
        "\n| architecture | steps | img/s | FID | KID | precision | recall | flagged "
        "| worst class flagged | record share |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    floor = rows[0]["metrics"]["overall"]["floor"]
    print(
        f"| real held-out (floor) | | | {floor['fid']:.2f} | {floor['kid']:.4f} | "
        f"{floor['precision']:.2f} | {floor['recall']:.2f} | | | |"
    )
    for r in rows:
        g = r["metrics"]["overall"]["generated"]
        worst = max(r["flagged_per_class"], key=r["flagged_per_class"].get)
        print(
            f"| {r['architecture']} | {r['steps']} | {r['images_per_s']} | {g['fid']:.1f} | "
            f"{g['kid']:.4f} | {g['precision']:.2f} | {g['recall']:.2f} | {r['flagged']:.1%} | "
            f"{r['flagged_per_class'][worst]:.1%} ({worst}) | {r['dcr_train_share']:.2f} |"
        )


if __name__ == "__main__":
    main()
