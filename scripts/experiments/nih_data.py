"""The NIH ChestX-ray14 64x64 demo subset as arrays, split by patient (experiment helper)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

NIH_DIR = Path("/work/shared/data/nih-cxr14-64")
CLASSES = ["Normal", "Cardiomegaly", "Effusion", "Edema", "Pneumothorax"]


@dataclass
class Split:
    classes: list[str]
    train_images: np.ndarray  # (N, R, R) uint8
    train_labels: np.ndarray  # (N,) int64
    holdout_images: np.ndarray  # (H, R, R) uint8
    holdout_labels: np.ndarray  # (H,) int64


def load_split(folder: Path = NIH_DIR, holdout_fraction: float = 0.2, seed: int = 0) -> Split:
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
