"""Decoding one file into de-identified training pixels plus minimal metadata.

Runs inside a child process of :mod:`synthray.app.datasets.pool`, under a memory cap,
so a hostile or broken file can at worst kill that child. Everything that leaves this
module is either pixels, a pseudonym (HMAC under the site secret), or a coarse
attribute (view, sex, age band). Reasons for rejecting a file are fixed phrases that
never quote the file's contents.

DICOM handling (pydicom 3 with the pylibjpeg decoders for JPEG, JPEG-LS, JPEG 2000 and
RLE):

1. the header is checked before any pixel is decoded: pixel data present, a radiograph
   (CR, DX, or Secondary Capture), BurnedInAnnotation not YES, and Rows x Columns x
   Frames x Samples x BitsAllocated under the configured limit (pydicom allocates what
   the header claims, so a tiny file can otherwise ask for gigabytes);
2. the header is de-identified with the DICOM PS3.15 Annex E Basic Application Level
   Confidentiality Profile, from the machine-readable tables that `dicom-anonymizer`
   ships (edition 2026c), private tags removed; the only values taken from the original
   header are the patient id (turned into an HMAC at once) and, under the Retain Patient
   Characteristics option, sex and an age band;
3. pixels: Modality LUT (rescale), then the VOI LUT or the first window, else a robust
   0.5-99.5 percentile range; MONOCHROME1 or a Presentation LUT Shape of INVERSE
   displays inverted, so the result is inverted once; the first frame of multi-frame
   images is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_RASTER_PIXELS = 64_000_000
DEIDENTIFICATION_TABLE = "dicomfields_2026c"
DEIDENTIFICATION = {
    "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
    "table": f"dicom-anonymizer {DEIDENTIFICATION_TABLE}",
    "private_tags": "removed",
    "options": ["Retain Patient Characteristics (sex, age band only)"],
    "method_codes": ["113100", "113108"],  # DCM codes: Basic Profile, Retain Pt Charac.
    "patient_identity_removed": "YES",
    "stored": "pixels and pseudonymous metadata only; no DICOM header is stored",
    "burned_in_text": "files declaring BurnedInAnnotation YES are rejected unless allowed; "
    "pixel text that a header does not declare is not detected",
}
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG", "OT"}
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


class Rejected(Exception):
    """The file cannot be used; the message is a fixed, PHI-free phrase."""


@dataclass
class DecodeOptions:
    sizes: tuple[int, ...]
    secret: str
    allow_burned_in: bool = False
    max_pixel_bytes: int = 512 * 1024 * 1024
    label_attribute: str | None = None


@dataclass
class Decoded:
    kind: str  # "dicom" | "png" | "jpeg"
    pixels: dict[int, np.ndarray]  # size -> (size, size) uint8
    pixel_sha256: str
    patient_key: str | None = None
    sop_key: str | None = None
    view: str | None = None
    sex: str | None = None
    age_band: str | None = None
    label_value: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def keyed_hash(secret: str, purpose: str, value: str) -> str:
    """HMAC-SHA256 pseudonym of ``value``; ``purpose`` separates patient ids from UIDs."""
    mac = hmac.new(secret.encode(), f"{purpose}:".encode() + value.encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


def age_band(age: float | None) -> str | None:
    if age is None or not 0 <= age <= 130:
        return None
    if age >= 90:  # HIPAA safe harbour: ages over 89 are aggregated
        return "90+"
    low = int(age) // 10 * 10
    return f"{low}-{low + 9}"


def parse_age(value: str | None) -> float | None:
    """A CSV age ('56') or a DICOM AS value ('056Y', '018M', '003W', '010D')."""
    v = (value or "").strip().upper()
    if not v:
        return None
    unit = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52, "D": 1 / 365}.get(v[-1])
    try:
        return float(v[:-1]) * unit if unit else float(v)
    except ValueError:
        return None


def normalise_sex(value: str | None) -> str | None:
    v = (value or "").strip().upper()[:1]
    return v if v in {"M", "F", "O"} else None


def to_square(img: Image.Image, size: int) -> np.ndarray:
    """Grey PIL image -> (size, size) uint8: long side scaled to ``size``, short side padded.

    ``reducing_gap`` lets Pillow first shrink by an integer factor (box filter), then
    finish with Lanczos: near-identical to pure Lanczos at a fraction of the cost.
    """
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def unit_to_u8(unit: np.ndarray) -> np.ndarray:
    return (np.clip(unit, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _finish(kind: str, img8: np.ndarray, opts: DecodeOptions) -> Decoded:
    """Display-ready uint8 pixels -> the stored squares and a hash of the full image."""
    img8 = np.ascontiguousarray(img8, dtype=np.uint8)
    digest = hashlib.sha256(img8.tobytes() + str(img8.shape).encode()).hexdigest()
    pil = Image.fromarray(img8, "L")
    return Decoded(
        kind=kind,
        pixels={s: to_square(pil, s) for s in opts.sizes},
        pixel_sha256=digest,
    )


# ------------------------------------------------------------------------------ raster


def decode_raster(data: bytes, opts: DecodeOptions) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in {"PNG", "JPEG"}:
                    raise Rejected("unsupported image format")
                if im.width * im.height > MAX_RASTER_PIXELS:
                    raise Rejected("image is larger than the pixel limit")
                im.load()
                kind = im.format.lower()
                if im.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
                    arr = np.asarray(im, dtype=np.float64)
                    lo, hi = float(arr.min()), float(arr.max())
                    img8 = unit_to_u8((arr - lo) / (hi - lo) if hi > lo else arr * 0.0)
                else:
                    rgb: Image.Image = im
                    if im.mode in {"RGBA", "LA", "PA", "P"}:
                        rgb = im.convert("RGBA").convert("RGB")
                    img8 = np.asarray(rgb.convert("L"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("image is larger than the pixel limit") from exc
    except UnidentifiedImageError as exc:
        raise Rejected("not a readable PNG, JPEG or DICOM file") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise Rejected("image data is truncated or corrupt") from exc
    return _finish(kind, img8, opts)


# ------------------------------------------------------------------------------- DICOM


def _first(value: Any) -> float | None:
    try:
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _window(ds: Any, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Modality LUT then VOI, to [0, 1] (not yet inverted).

    ``values`` are stored pixel values (the whole image, or each distinct value once
    with ``weights`` = how often it occurs: the same result, computed on a table).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out = apply_modality_lut(values, ds).astype(np.float64)
    w = np.ones_like(out) if weights is None else weights.astype(np.float64)
    if "VOILUTSequence" in ds:
        out = apply_voi_lut(out, ds, index=0).astype(np.float64)
        lo, hi = float(out[w > 0].min()), float(out[w > 0].max())
        return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        # PS3.3 C.11.2.1.2.1, linear function
        win = np.clip((out - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)
        inside = float(w[(win > 0.0) & (win < 1.0)].sum() / max(w.sum(), 1.0))
        if inside >= 0.05:
            return win
        # A window that misses almost every pixel contradicts the data (seen with JPEG
        # 2000 streams whose signedness differs from the header): use the robust range.
    order = np.argsort(out, kind="stable")
    cum = np.cumsum(w[order]) / max(w.sum(), 1.0)
    lo = float(out[order][np.searchsorted(cum, 0.005)])
    hi = float(out[order][min(int(np.searchsorted(cum, 0.995)), len(cum) - 1)])
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(out)


def _display_u8(ds: Any, arr: np.ndarray, invert: bool) -> np.ndarray:
    """Stored pixels -> display-ready uint8.

    Integer images of up to 16 bits go through a lookup table over every possible stored
    value: one gather over the pixels instead of several float passes. The statistics
    the table needs (is the window plausible, robust range) come from a histogram of
    every 4th pixel in each direction.
    """
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        offset = -(1 << (8 * arr.dtype.itemsize - 1)) if arr.dtype.kind == "i" else 0
        values = np.arange(offset, offset + (1 << (8 * arr.dtype.itemsize)), dtype=np.int64)
        index = arr.view(np.uint16 if arr.dtype.itemsize == 2 else np.uint8)
        if offset:  # two's complement: reorder so that index = value - offset
            index = index ^ np.array(1 << (8 * arr.dtype.itemsize - 1), dtype=index.dtype)
        hist = np.bincount(index[::4, ::4].ravel(), minlength=len(values))
        unit = _window(ds, values.astype(arr.dtype), hist)
        lut = unit_to_u8(1.0 - unit if invert else unit)
        return lut[index]
    unit = _window(ds, arr)
    return unit_to_u8(1.0 - unit if invert else unit)


def _check_header(ds: Any, opts: DecodeOptions) -> None:
    if "PixelData" not in ds:
        raise Rejected("DICOM file has no pixel data")
    modality = str(ds.get("Modality", "") or "").upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality not in RADIOGRAPH_MODALITIES and not sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        raise Rejected("DICOM file is not a radiograph (CR, DX or Secondary Capture)")
    if str(ds.get("BurnedInAnnotation", "") or "").upper() == "YES" and not opts.allow_burned_in:
        raise Rejected("DICOM file declares burned-in annotation")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise Rejected("DICOM image header is incomplete") from exc
    if min(rows, cols, frames, samples, bits) <= 0:
        raise Rejected("DICOM image header is incomplete")
    if rows * cols * frames * samples * bits // 8 > opts.max_pixel_bytes:
        raise Rejected("DICOM image claims more pixel data than the limit")


def _deidentify(ds: Any) -> None:
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions

    with io.StringIO() as sink, contextlib.redirect_stdout(sink):  # it prints notices
        anonymize_dataset(
            ds,
            delete_private_tags=True,
            base_rules_gen=lambda: initialize_actions(DEIDENTIFICATION_TABLE),
        )
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION["profile"]


def decode_dicom(data: bytes, opts: DecodeOptions) -> Decoded:
    try:
        return _decode_dicom(data, opts)
    except Rejected:
        raise
    except MemoryError as exc:
        raise Rejected("decoding the image exceeded the memory limit") from exc
    except RecursionError as exc:
        raise Rejected("DICOM file is nested too deeply") from exc
    except Exception as exc:  # malformed headers surface as any exception type
        raise Rejected("DICOM file is malformed") from exc


def _decode_dicom(data: bytes, opts: DecodeOptions) -> Decoded:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise Rejected("not a readable DICOM file") from exc
    except Exception as exc:  # pydicom raises many types on malformed headers
        raise Rejected("not a readable DICOM file") from exc
    if len(ds) == 0 or ("Rows" not in ds and "PixelData" not in ds):
        raise Rejected("not a readable PNG, JPEG or DICOM file")
    _check_header(ds, opts)
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        # Legacy ACR-NEMA style file without a file meta header: the encoding pydicom
        # detected while reading tells us the transfer syntax.
        implicit, little = getattr(ds, "original_encoding", (True, True))
        if not little:
            raise Rejected("big-endian DICOM without file meta is not supported")
        ds.ensure_file_meta()
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian)
        )

    # Values kept from the original header: the pseudonymised ids and coarse attributes.
    patient_id = str(ds.get("PatientID", "") or "").strip()
    sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    sex = normalise_sex(str(ds.get("PatientSex", "") or ""))
    age = parse_age(str(ds.get("PatientAge", "") or ""))
    if age is None:
        birth, study = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
        if len(birth) >= 4 and len(study) >= 4 and birth[:4].isdigit() and study[:4].isdigit():
            age = float(int(study[:4]) - int(birth[:4]))
    label_value = None
    if opts.label_attribute:
        raw = ds.get(opts.label_attribute)
        label_value = str(raw).strip() if raw is not None else None

    _deidentify(ds)
    view = str(ds.get("ViewPosition", "") or "").strip().upper()[:10] or None

    try:
        arr = ds.pixel_array
    except MemoryError as exc:
        raise Rejected("decoding the DICOM image exceeded the memory limit") from exc
    except Exception as exc:
        raise Rejected("DICOM pixel data cannot be decoded") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    plut = str(ds.get("PresentationLUTShape", "") or "").upper()
    invert = photometric == "MONOCHROME1" or plut == "INVERSE"
    if samples == 3:
        grey = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        img8 = unit_to_u8(grey / max(float(grey.max()), 1.0))
    elif arr.ndim != 2:
        raise Rejected("DICOM pixel data has an unexpected shape")
    else:
        img8 = _display_u8(ds, arr, invert)
    out = _finish("dicom", img8, opts)
    out.patient_key = keyed_hash(opts.secret, "patient", patient_id) if patient_id else None
    out.sop_key = keyed_hash(opts.secret, "sop", sop_uid) if sop_uid else None
    out.view, out.sex, out.age_band, out.label_value = view, sex, age_band(age), label_value
    return out


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def decode_bytes(data: bytes, opts: DecodeOptions) -> Decoded:
    with warnings.catch_warnings():
        # pydicom warns about out-of-spec values (long strings, odd lengths) in real files;
        # they are either decoded anyway or rejected below, and the text must not be logged.
        warnings.simplefilter("ignore")
        return _decode_bytes(data, opts)


def _decode_bytes(data: bytes, opts: DecodeOptions) -> Decoded:
    if is_dicom(data):
        return decode_dicom(data, opts)
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff":
        return decode_raster(data, opts)
    return decode_dicom(data, opts)  # legacy DICOM without preamble, or garbage


def decode_path(path: Path, opts: DecodeOptions, max_file_bytes: int) -> Decoded:
    try:
        size = path.stat().st_size
        if size > max_file_bytes:
            raise Rejected("file is larger than the size limit")
        data = path.read_bytes()
    except OSError as exc:
        raise Rejected("file cannot be read") from exc
    if not data:
        raise Rejected("file is empty")
    return decode_bytes(data, opts)
