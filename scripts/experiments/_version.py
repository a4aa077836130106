"""What the experiment scripts read, as the product's jobs read it: about one registered
generator version, its classes and resolution, its dataset version's split, the real
training films the evaluation selects, the held-out films of its classes, and where its
weights are (:func:`load_version`); about a dataset version alone, the same films
(:func:`load_films`). And :func:`parse_variant` for the scripts' override lists."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Version:
    classes: list[str]
    resolution: int
    dataset_version_id: int
    split: Any  # synthray.app.datasets.service.SplitArrays
    real: Any  # the training set (images, labels) the evaluation selects
    test_x: np.ndarray  # held-out films of the version's classes
    test_y: np.ndarray  # their labels, indices into ``classes``
    weights: Path
    weights_sha256: str
    blobs: Any  # synthray.app.storage.BlobStore


def load_version(model: str, version: int) -> Version:
    """The version ``model`` v``version`` of the registry under SYNTHRAY_DATA_DIR."""
    from synthray.app.datasets import service as datasets
    from synthray.app.db import session_factory
    from synthray.app.registry import service as registry
    from synthray.app.storage import BlobStore
    from synthray.config import get_settings

    settings = get_settings()
    blobs = BlobStore(settings.blob_dir)
    with session_factory(settings.sqlalchemy_url)() as s:
        mv = registry.get_version(s, model, version)
        row = registry.get_version_by_id(s, mv.id)
        classes = list(row.classes)
        resolution = int(row.config["generator"]["resolution"])
        split = datasets.load_split(s, blobs, row.dataset_version_id, resolution)
        real = datasets.training_set(s, split, row.dataset_version_id, classes)
        mask, test_y = datasets.select_classes(split.holdout_labels, split.classes, classes)
        return Version(
            classes=classes,
            resolution=resolution,
            dataset_version_id=row.dataset_version_id,
            split=split,
            real=real,
            test_x=split.holdout_images[mask],
            test_y=test_y,
            weights=blobs.path(row.blob_sha256),
            weights_sha256=row.blob_sha256,
            blobs=blobs,
        )


@dataclass
class Films:
    real: Any  # the training set (images, labels) the evaluation selects
    test_x: np.ndarray  # held-out films of the classes
    test_y: np.ndarray  # their labels, indices into the classes


def load_films(dataset: str, version: int | None, resolution: int, classes: list[str]) -> Films:
    """The training and held-out films of ``classes`` of a dataset version (the latest ready
    one when ``version`` is None) under SYNTHRAY_DATA_DIR, at ``resolution``."""
    from synthray.app.datasets import service as datasets
    from synthray.app.db import session_factory
    from synthray.app.storage import BlobStore
    from synthray.config import get_settings

    settings = get_settings()
    blobs = BlobStore(settings.blob_dir)
    with session_factory(settings.sqlalchemy_url)() as s:
        dv = datasets.resolve_version(s, dataset, version)
        split = datasets.load_split(s, blobs, dv.id, resolution)
        real = datasets.training_set(s, split, dv.id, classes)
        mask, test_y = datasets.select_classes(split.holdout_labels, split.classes, classes)
        return Films(real=real, test_x=split.holdout_images[mask], test_y=test_y)


def parse_variant(text: str) -> dict[str, object]:
    """``"batch_size=16, flow_width=24"`` -> {"batch_size": 16, "flow_width": 24} (JSON
    values)."""
    out: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, value = item.split("=", 1)
        out[key.strip()] = json.loads(value)
    return out
