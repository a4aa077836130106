"""The ingest job: decode, label, pseudonymise, split by patient, store one version.

Only de-identified pixels (resized, padded to a square) and minimal metadata are kept:
a pseudonymous patient key (HMAC-SHA256 of the patient id under the site secret), the
label, view, sex and an age band. Original files are never copied. Problems with one
file skip that file, with a reason recorded by its row number in the labels CSV.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from synthray.app.datasets import repository
from synthray.app.datasets.schemas import DatasetCreate
from synthray.app.jobs.context import JobCancelled, JobContext, JobFailed

MAX_PIXELS = 64_000_000  # refuse anything larger before decoding (decompression bombs)
MAX_SKIPS_LISTED = 200


@dataclass
class Decoded:
    pixels: np.ndarray  # (R, R) uint8
    sha256: str


def patient_key(secret: str, patient_id: str) -> str:
    digest = hmac.new(secret.encode(), b"patient:" + patient_id.encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


def age_band(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    try:
        age = int(float(value.strip().rstrip("Yy")))
    except ValueError:
        return None
    if age < 0 or age > 120:
        return None
    if age >= 90:  # HIPAA safe harbour: ages over 89 are aggregated
        return "90+"
    low = age // 10 * 10
    return f"{low}-{low + 9}"


def to_square(img: Image.Image, size: int) -> np.ndarray:
    """Grey uint8, aspect ratio kept: scale the long side to ``size``, pad the short one."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((nw, nh), Image.Resampling.LANCZOS) if (nw, nh) != (w, h) else img
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def decode_image(path: Path, size: int) -> Decoded:
    """PNG or JPEG to a padded square grey array. Raises ValueError with a safe reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ValueError("image is larger than the pixel limit")
                if im.format not in {"PNG", "JPEG"}:
                    raise ValueError(f"unsupported image format {im.format}")
                im.load()
                if im.mode in {"I;16", "I;16B", "I", "F"}:
                    arr = np.asarray(im, dtype=np.float64)
                    lo, hi = float(arr.min()), float(arr.max())
                    arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
                    grey = Image.fromarray(arr.round().astype(np.uint8), mode="L")
                elif im.mode in {"RGBA", "LA", "PA"}:
                    grey = im.convert("RGBA").convert("RGB").convert("L")
                else:
                    grey = im.convert("L")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError("image is larger than the pixel limit") from exc
    except UnidentifiedImageError as exc:
        raise ValueError("not a readable PNG or JPEG image") from exc
    except OSError as exc:
        raise ValueError("image data is truncated or corrupt") from exc
    pixels = to_square(grey, size)
    return Decoded(pixels=pixels, sha256=hashlib.sha256(pixels.tobytes()).hexdigest())


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


def run_ingest(ctx: JobContext) -> dict[str, object]:
    spec = DatasetCreate.model_validate(
        {k: v for k, v in ctx.params.items() if k not in {"version_id", "folder"}}
    )
    version_id = int(ctx.params["version_id"])
    folder = Path(ctx.params["folder"]).resolve()
    csv_path = folder / spec.labels_csv
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise JobFailed("the labels CSV cannot be read") from exc
    if not rows:
        raise JobFailed("the labels CSV has no rows")

    size = spec.resolution
    images: list[np.ndarray] = []
    meta: list[dict[str, object]] = []
    skipped: list[dict[str, object]] = []
    reasons: Counter[str] = Counter()
    seen: set[str] = set()

    def skip(row_no: int, reason: str) -> None:
        reasons[reason] += 1
        if len(skipped) < MAX_SKIPS_LISTED:
            skipped.append({"row": row_no, "reason": reason})

    total = len(rows)
    for i, row in enumerate(rows):
        row_no = i + 2  # header is row 1
        if i % 50 == 0:
            if ctx.should_stop():
                raise JobCancelled()
            ctx.progress(i, total, f"decoding images ({i}/{total})")
        rel = (row.get(spec.file_column) or "").strip()
        pid = (row.get(spec.patient_column) or "").strip()
        if not rel:
            skip(row_no, "no file name")
            continue
        if not pid:
            skip(row_no, "no patient id")
            continue
        labels = _labels_of(row.get(spec.label_column) or "", spec)
        if not labels:
            skip(row_no, "no label in the class list")
            continue
        if len(labels) > 1:
            skip(row_no, "more than one class of the class list")
            continue
        path = (folder / rel).resolve()
        if folder not in path.parents:
            skip(row_no, "file path leaves the source folder")
            continue
        if not path.is_file():
            skip(row_no, "file not found")
            continue
        try:
            decoded = decode_image(path, size)
        except ValueError as exc:
            skip(row_no, str(exc))
            continue
        if decoded.sha256 in seen:
            skip(row_no, "exact duplicate of an earlier image")
            continue
        seen.add(decoded.sha256)
        images.append(decoded.pixels)
        meta.append(
            {
                "patient_key": patient_key(ctx.settings.secret_key, pid),
                "label": spec.classes.index(labels[0]),
                "view": (row.get(spec.view_column) or "").strip()[:10] or None
                if spec.view_column
                else None,
                "sex": _sex(row.get(spec.sex_column)) if spec.sex_column else None,
                "age_band": age_band(row.get(spec.age_column)) if spec.age_column else None,
                "pixel_sha256": decoded.sha256,
            }
        )

    if not images:
        raise JobFailed(f"no usable image: all {total} rows were skipped ({dict(reasons)})")
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
    images_arr = np.stack(images)  # (N, R, R) uint8
    blob, _ = ctx.blobs.put_arrays(images=images_arr, labels=labels_arr)
    counts = _counts(meta, spec.classes)
    counts["rows"] = total
    counts["images"] = len(images)
    counts["patients"] = len(patients)
    counts["holdout_patients"] = len(holdout)
    counts["skipped"] = sum(reasons.values())
    counts["skip_reasons"] = dict(reasons)
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
        v.state = "ready"
        v.provenance = {
            "source": "png/jpeg import",
            "pixels": f"grey uint8, padded square {size}x{size}",
            "patient_key": "HMAC-SHA256(site secret, patient id)[:32]",
            "kept_metadata": ["patient_key", "label", "view", "sex", "age_band"],
        }
    return {"version_id": version_id, "counts": counts, "skipped": skipped}


def _sex(value: str | None) -> str | None:
    v = (value or "").strip().upper()[:1]
    return v if v in {"M", "F", "O"} else None


def _counts(meta: list[dict[str, object]], classes: list[str]) -> dict[str, object]:
    per: dict[str, dict[str, int]] = {c: {"train": 0, "holdout": 0} for c in classes}
    for m in meta:
        per[classes[int(m["label"])]][str(m["split"])] += 1  # type: ignore[call-overload]
    return {"per_class": per}
