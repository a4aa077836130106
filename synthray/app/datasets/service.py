from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from synthray.app.datasets import repository
from synthray.app.datasets.schemas import (
    DatasetCreate,
    DatasetRead,
    DatasetVersionState,
    IngestAccepted,
)
from synthray.app.datasets.tables import DatasetVersion
from synthray.app.errors import Conflict, Invalid, NotFound
from synthray.app.jobs import service as jobs
from synthray.app.jobs.schemas import JobKind
from synthray.app.storage import BlobStore
from synthray.config import Settings


def resolve_source(settings: Settings, source: str) -> Path:
    """The import folder, which must lie inside the configured import root."""
    if settings.import_root is None:
        raise Invalid("server-side import is disabled: set SYNTHRAY_IMPORT_ROOT", field="source")
    root = settings.import_root.resolve()
    path = (root / source).resolve()
    if path != root and root not in path.parents:
        raise Invalid("source must be a folder inside the import root", field="source")
    if not path.is_dir():
        raise Invalid("source is not a folder under the import root", field="source")
    return path


def _check_csv(folder: Path, spec: DatasetCreate) -> None:
    if not spec.labels_csv:
        return
    folder = folder.resolve()
    csv_path = (folder / spec.labels_csv).resolve()
    if folder not in csv_path.parents or not csv_path.is_file():
        raise Invalid("labels_csv is not a file inside the source folder", field="labels_csv")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise Invalid("labels_csv cannot be read as UTF-8 CSV", field="labels_csv") from exc
    wanted = {
        "file_column": spec.file_column,
        "sop_column": spec.sop_column,
        "label_column": spec.label_column,
        "patient_column": spec.patient_column,
        "view_column": spec.view_column,
        "sex_column": spec.sex_column,
        "age_column": spec.age_column,
    }
    for field, column in wanted.items():
        if column is not None and column not in header:
            raise Invalid(f"labels_csv has no column named as {field} says", field=field)


def request_ingest(
    session: Session,
    settings: Settings,
    spec: DatasetCreate,
    created_by: int,
    upload_dir: Path | None = None,
) -> IngestAccepted:
    """Validate what can be checked now and queue the ingest job.

    ``upload_dir`` holds uploaded files (already extracted) in its ``data`` folder; the
    ingest job deletes it whatever its outcome, so no original file outlives the ingest.
    """
    if upload_dir is not None:
        folder = upload_dir / "data"
    else:
        folder = resolve_source(settings, spec.source)
    _check_csv(folder, spec)
    ds = repository.lock_or_add(session, spec.name)
    version = repository.add_version(
        session,
        DatasetVersion(
            dataset_id=ds.id,
            version=repository.next_version(session, ds.id),
            state=DatasetVersionState.ingesting,
            resolutions=list(spec.resolutions),
            classes=list(spec.classes),
            holdout_fraction=spec.holdout_fraction,
            split_seed=spec.split_seed,
        ),
    )
    params = spec.model_dump() | {"version_id": version.id, "folder": str(folder)}
    if upload_dir is not None:
        params["upload_dir"] = str(upload_dir)
    job = jobs.create(session, settings, JobKind.ingest, params, created_by)
    version.ingest_job_id = job.id
    session.flush()
    return IngestAccepted(dataset=ds.name, version=version.version, job_id=job.id)


def list_datasets(session: Session) -> list[DatasetRead]:
    return [DatasetRead.model_validate(ds) for ds in repository.list_datasets(session)]


def get_dataset(session: Session, name: str) -> DatasetRead:
    ds = repository.get_by_name(session, name, with_versions=True)
    if ds is None:
        raise NotFound(f"dataset {name!r} not found")
    return DatasetRead.model_validate(ds)


def resolve_version(session: Session, name: str, version: int | None) -> DatasetVersion:
    """A ready dataset version by name (latest ready one when version is None)."""
    ds = repository.get_by_name(session, name)
    if ds is None:
        raise Invalid(f"dataset {name!r} not found", field="dataset")
    v = repository.find_version(session, ds.id, version)
    if v is None:
        raise Invalid(f"dataset {name!r} has no ready version", field="version")
    if v.state != DatasetVersionState.ready:
        raise Conflict(f"dataset {name!r} version {v.version} is {v.state}, not ready")
    return v


def ready_version(session: Session, version_id: int) -> DatasetVersion:
    """A ready dataset version by id (its split, counts and provenance)."""
    v = repository.get_version(session, version_id)
    if v is None or v.state != DatasetVersionState.ready or v.images_blob is None:
        raise NotFound(f"dataset version {version_id} is not ready")
    return v


def content_sha256(session: Session, version_id: int) -> str:
    """The sha256 that names a ready version's content (recorded in its models' lineage)."""
    v = ready_version(session, version_id)
    assert v.content_sha256 is not None  # set together with the ready state
    return v.content_sha256


def ingest_ended(session: Session, version_id: int, state: str) -> None:
    """A version still ingesting takes the end state of its failed or cancelled ingest job."""
    v = repository.get_version(session, version_id)
    if v is not None and v.state == DatasetVersionState.ingesting:
        v.state = DatasetVersionState(state)
        session.flush()


@dataclass
class SplitArrays:
    """De-identified pixels of one dataset version at one resolution, split by patient."""

    classes: list[str]
    resolution: int
    train_images: np.ndarray  # (N, R, R) uint8
    train_labels: np.ndarray  # (N,) int64
    train_index: np.ndarray  # (N,) position in the version
    holdout_images: np.ndarray
    holdout_labels: np.ndarray
    holdout_index: np.ndarray


def load_split(
    session: Session, blobs: BlobStore, version_id: int, resolution: int | None = None
) -> SplitArrays:
    v = ready_version(session, version_id)
    assert v.images_blob is not None
    size = resolution or min(v.resolutions)
    if size not in v.resolutions:
        raise NotFound(f"dataset version {version_id} has no {size}px images")
    arrays = blobs.get_arrays(v.images_blob)
    images, labels = arrays[f"images_{size}"], arrays["labels"].astype(np.int64)
    rows = repository.image_rows(session, version_id)
    is_train = np.array([r.split == "train" for r in rows], dtype=bool)
    idx = np.arange(len(rows))
    return SplitArrays(
        classes=list(v.classes),
        resolution=size,
        train_images=images[is_train],
        train_labels=labels[is_train],
        train_index=idx[is_train],
        holdout_images=images[~is_train],
        holdout_labels=labels[~is_train],
        holdout_index=idx[~is_train],
    )


def images_at(
    session: Session, blobs: BlobStore, version_id: int, resolution: int, positions: list[int]
) -> dict[int, np.ndarray]:
    """The de-identified images at ``positions`` of a dataset version, at ``resolution``
    (for staff pages that show a synthetic image's nearest training images)."""
    v = ready_version(session, version_id)
    assert v.images_blob is not None
    if resolution not in v.resolutions or not positions:
        return {}
    return blobs.array_rows(v.images_blob, f"images_{resolution}", positions)


def patient_keys(session: Session, version_id: int, positions: np.ndarray) -> np.ndarray:
    """Pseudonymous patient keys of the images at ``positions`` of a dataset version."""
    rows = repository.image_rows(session, version_id)
    keys = np.array([r.patient_key for r in rows], dtype=object)
    return keys[np.asarray(positions, dtype=np.int64)]


def split_patient_keys(
    session: Session, version_id: int, split: SplitArrays
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudonymous patient keys of the split's training and held-out images, from one
    read of the version's rows."""
    n = len(split.train_index)
    keys = patient_keys(session, version_id, np.r_[split.train_index, split.holdout_index])
    return keys[:n], keys[n:]


def shared_patients(session: Session, train_version_id: int, other_version_id: int) -> int:
    """Pseudonymous patients of the first version's training split found anywhere in the
    second version (the same patient has the same key under one site secret)."""
    return repository.shared_patients(session, train_version_id, other_version_id)


def keep_fraction_by_patient(
    labels: np.ndarray, keys: np.ndarray, fractions: dict[int, float], seed: int
) -> np.ndarray:
    """(N,) bool: which images stay when only ``fractions[c]`` of class c's images are kept,
    taking whole patients in a seeded random order until that many images are kept (at
    least one). A patient's images of other classes are not affected."""
    keep = np.ones(len(labels), dtype=bool)
    for c, fraction in sorted(fractions.items()):
        in_class = np.flatnonzero(labels == c)
        if fraction >= 1.0 or len(in_class) == 0:
            continue
        target = max(1, round(fraction * len(in_class)))
        patients = sorted(set(keys[in_class].tolist()))
        order = np.random.default_rng([seed, c]).permutation(len(patients))
        per_patient = Counter(keys[in_class].tolist())
        kept = 0
        chosen: set[str] = set()
        for i in order:
            if kept >= target:
                break
            chosen.add(patients[i])
            kept += per_patient[patients[i]]
        keep[in_class] = np.isin(keys[in_class], list(chosen))
    return keep


def select_classes(
    labels: np.ndarray, names: list[str], classes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Which images (labels index ``names``) belong to ``classes``, and their labels
    re-indexed to ``classes``: (mask (N,) bool, labels (mask.sum(),) int64)."""
    index = {names.index(c): i for i, c in enumerate(classes)}
    mask = np.isin(labels, list(index))
    return mask, np.array([index[int(v)] for v in labels[mask]], dtype=np.int64)


@dataclass
class TrainingSet:
    """The real images a generator trains on: its classes of the training split, less
    any induced imbalance. Labels index ``classes``."""

    classes: list[str]
    images: np.ndarray  # (N, R, R) uint8
    labels: np.ndarray  # (N,) int64
    positions: np.ndarray  # (N,) positions in the dataset version


def training_set(
    session: Session,
    split: SplitArrays,
    version_id: int,
    classes: list[str],
    imbalance: dict[str, float] | None = None,
    imbalance_seed: int = 0,
) -> TrainingSet:
    """The training images of ``classes`` (in the version's class order), with
    ``imbalance`` (class name -> fraction of its images kept, by patient) applied."""
    mask, labels = select_classes(split.train_labels, split.classes, classes)
    images, positions = split.train_images[mask], split.train_index[mask]
    if imbalance:
        keys = patient_keys(session, version_id, positions)
        fractions = {classes.index(c): float(f) for c, f in imbalance.items()}
        sub = keep_fraction_by_patient(labels, keys, fractions, imbalance_seed)
        images, labels, positions = images[sub], labels[sub], positions[sub]
    return TrainingSet(list(classes), images, labels, positions)
