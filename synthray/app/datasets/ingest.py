"""The ingest job: decode, label, pseudonymise, split by patient, store one version.

Only de-identified pixels (resized, padded to squares at each requested resolution) and
minimal metadata are kept: a pseudonymous patient key (HMAC-SHA256 of the patient id
under the site secret), the label, view, sex and an age band. Original files are never
copied into the store, and uploaded files are deleted when the job ends. A problem with
one file skips that file, with a fixed reason recorded against its position ("row 7" of
the labels CSV, or "file 12" of the folder in sorted order), never its name.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthray.app.datasets import repository
from synthray.app.datasets.decode import (
    DEIDENTIFICATION,
    DecodeOptions,
    age_band,
    keyed_hash,
    normalise_sex,
    parse_age,
)
from synthray.app.datasets.pool import DecodePool
from synthray.app.datasets.schemas import DatasetCreate, DatasetVersionState
from synthray.app.jobs.context import JobCancelled, JobContext, JobFailed

MAX_SKIPS_LISTED = 500
PROGRESS_EVERY = 25


def patient_key(secret: str, patient_id: str) -> str:
    return keyed_hash(secret, "patient", patient_id)


@dataclass
class Item:
    position: str  # "row 7" or "file 12": never a file name
    path: Path | None  # None: the row was rejected before decoding
    row: dict[str, str] | None
    reason: str | None = None


def _labels_of(raw: str, spec: DatasetCreate) -> list[str]:
    parts = raw.split(spec.label_separator) if spec.label_separator else [raw]
    mapped = [spec.label_map.get(p.strip(), p.strip()) for p in parts if p.strip()]
    return [m for m in dict.fromkeys(mapped) if m in spec.classes]


def _split(keys: set[str], fraction: float, seed: int) -> set[str]:
    """Holdout patients: a deterministic draw by hashed key, at least one patient."""

    def u(k: str) -> float:
        h = hashlib.sha256(f"{seed}:{k}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    ordered = sorted(keys, key=u)
    n = max(1, round(len(ordered) * fraction))
    return set(ordered[:n])


def _read_csv(folder: Path, spec: DatasetCreate) -> list[dict[str, str]]:
    assert spec.labels_csv is not None
    try:
        with (folder / spec.labels_csv).open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise JobFailed("the labels CSV cannot be read") from exc


def _items_from_rows(folder: Path, rows: list[dict[str, str]], spec: DatasetCreate) -> list[Item]:
    assert spec.file_column is not None
    items = []
    for i, row in enumerate(rows):
        pos = f"row {i + 2}"  # the header is row 1
        rel = (row.get(spec.file_column) or "").strip()
        path = (folder / rel).resolve() if rel else None
        if path is None:
            items.append(Item(pos, None, row, "no file name"))
        elif folder not in path.parents:
            items.append(Item(pos, None, row, "file path leaves the source folder"))
        elif not path.is_file() or path.is_symlink():
            items.append(Item(pos, None, row, "file not found"))
        else:
            items.append(Item(pos, path, row))
    return items


def _items_from_folder(folder: Path, spec: DatasetCreate) -> list[Item]:
    skip = (folder / spec.labels_csv).resolve() if spec.labels_csv else None
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith(".") or p.is_symlink() or p.resolve() == skip:
                continue
            files.append(p)
    files.sort(key=lambda p: p.relative_to(folder).as_posix())
    return [Item(f"file {i + 1}", p, None) for i, p in enumerate(files)]


def run_ingest(ctx: JobContext) -> dict[str, object]:
    params = {
        k: v for k, v in ctx.params.items() if k not in {"version_id", "folder", "upload_dir"}
    }
    spec = DatasetCreate.model_validate(params)
    version_id = int(ctx.params["version_id"])
    folder = Path(ctx.params["folder"]).resolve()
    secret = ctx.settings.secret_key

    rows = _read_csv(folder, spec) if spec.labels_csv else []
    if spec.labels_csv and not rows:
        raise JobFailed("the labels CSV has no rows")
    by_sop: dict[str, dict[str, str]] = {}
    if spec.sop_column:
        for csv_row in rows:
            uid = (csv_row.get(spec.sop_column) or "").strip()
            if uid:
                by_sop[keyed_hash(secret, "sop", uid)] = csv_row
    items = (
        _items_from_folder(folder, spec)
        if spec.walks_folder
        else _items_from_rows(folder, rows, spec)
    )
    if not items:
        raise JobFailed("the source holds no file to ingest")

    sizes = tuple(spec.resolutions)
    opts = DecodeOptions(
        sizes=sizes,
        secret=secret,
        allow_burned_in=spec.allow_burned_in,
        max_pixel_bytes=ctx.settings.max_pixel_bytes,
        label_attribute=spec.label_attribute,
    )
    images: dict[int, list[np.ndarray]] = {s: [] for s in sizes}
    meta: list[dict[str, object]] = []
    skipped: list[dict[str, str]] = []
    reasons: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    seen_pixels: set[str] = set()
    seen_sops: set[str] = set()

    def skip(pos: str, reason: str) -> None:
        reasons[reason] += 1
        if len(skipped) < MAX_SKIPS_LISTED:
            skipped.append({"item": pos, "reason": reason})

    for it in items:
        if it.reason:
            skip(it.position, it.reason)
    todo = [it for it in items if it.path is not None]
    total = len(items)
    done = total - len(todo)
    workers = ctx.settings.ingest_workers or os.cpu_count() or 1
    with DecodePool(workers, ctx.settings.decode_memory_limit) as pool:
        outcomes = pool.map(
            [str(it.path) for it in todo], opts, ctx.settings.max_file_bytes, ctx.should_stop
        )
        for it, (dec, reason) in zip(todo, outcomes, strict=False):
            done += 1
            if done % PROGRESS_EVERY == 0:
                ctx.progress(done, total, f"decoding ({done}/{total})")
            if dec is None:
                skip(it.position, reason or "file cannot be decoded")
                continue
            row = it.row
            if spec.sop_column:
                row = by_sop.get(dec.sop_key or "")
                if row is None:
                    skip(it.position, "no labels CSV row for this SOPInstanceUID")
                    continue
            raw_label = (
                (row.get(spec.label_column or "") or "") if row is not None else dec.label_value
            )
            labels = _labels_of(raw_label or "", spec)
            if not labels:
                skip(it.position, "no label in the class list")
                continue
            if len(labels) > 1:
                skip(it.position, "more than one class of the class list")
                continue
            if spec.patient_column and row is not None:
                pid = (row.get(spec.patient_column) or "").strip()
                pkey = patient_key(secret, pid) if pid else None
            else:
                pkey = dec.patient_key
            if not pkey:
                skip(it.position, "no patient id")
                continue
            if dec.sop_key and dec.sop_key in seen_sops:
                skip(it.position, "duplicate SOPInstanceUID of an earlier file")
                continue
            if dec.pixel_sha256 in seen_pixels:
                skip(it.position, "exact duplicate of an earlier image")
                continue
            seen_pixels.add(dec.pixel_sha256)
            if dec.sop_key:
                seen_sops.add(dec.sop_key)
            kinds[dec.kind] += 1
            for s in sizes:
                images[s].append(dec.pixels[s])

            def col(name: str | None, r: dict[str, str] | None = row) -> str | None:
                return (r.get(name) or "").strip() if (name and r is not None) else None

            meta.append(
                {
                    "patient_key": pkey,
                    "label": spec.classes.index(labels[0]),
                    "view": (col(spec.view_column) or dec.view or "")[:10].upper() or None,
                    "sex": normalise_sex(col(spec.sex_column)) or dec.sex,
                    "age_band": age_band(parse_age(col(spec.age_column))) or dec.age_band,
                    "pixel_sha256": dec.pixel_sha256,
                }
            )
    if ctx.should_stop():
        raise JobCancelled()

    if not meta:
        raise JobFailed(f"no usable image: all {total} items were skipped ({dict(reasons)})")
    labels_arr = np.array([m["label"] for m in meta], dtype=np.int64)
    present = set(labels_arr.tolist())
    missing = [c for i, c in enumerate(spec.classes) if i not in present]
    if missing:
        raise JobFailed(f"classes with no image: {missing}")
    patients = {str(m["patient_key"]) for m in meta}
    if len(patients) < 2:
        raise JobFailed("a patient-level split needs images from at least two patients")
    holdout = _split(patients, spec.holdout_fraction, spec.split_seed)
    for m in meta:
        m["split"] = "holdout" if m["patient_key"] in holdout else "train"

    ctx.progress(total, total, "storing the dataset version")
    arrays = {f"images_{s}": np.stack(images[s]) for s in sizes}  # (N, R, R) uint8 each
    blob, _ = ctx.blobs.put_arrays(labels=labels_arr, **arrays)
    counts: dict[str, object] = {"per_class": _per_class(meta, spec.classes)}
    counts |= {
        "items": total,
        "images": len(meta),
        "patients": len(patients),
        "holdout_patients": len(holdout),
        "skipped": sum(reasons.values()),
        "skip_reasons": dict(reasons),
        "formats": dict(kinds),
    }
    with ctx.session() as session:
        v = repository.get_version(session, version_id)
        if v is None:
            raise JobFailed("the dataset version row is gone")
        repository.add_images(
            session, [{"version_id": version_id, "idx": i} | m for i, m in enumerate(meta)]
        )
        v.images_blob = blob
        v.content_sha256 = blob
        v.counts = counts
        v.state = DatasetVersionState.ready
        v.provenance = {
            "pixels": f"grey uint8, padded squares at {list(sizes)} px",
            "patient_key": "HMAC-SHA256(site secret, patient id), 128 bits",
            "kept_metadata": ["patient_key", "label", "view", "sex", "age_band"],
            "deidentification": DEIDENTIFICATION,
            "source": "upload" if "upload_dir" in ctx.params else "import folder",
        }
    return {"version_id": version_id, "counts": counts, "skipped": skipped}


def _per_class(meta: list[dict[str, object]], classes: list[str]) -> dict[str, dict[str, int]]:
    per: dict[str, dict[str, int]] = {c: {"train": 0, "holdout": 0} for c in classes}
    for m in meta:
        per[classes[int(m["label"])]][str(m["split"])] += 1  # type: ignore[call-overload]
    return per
