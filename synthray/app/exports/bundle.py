"""The export bundle: synthetic PNGs, the same images as DICOM marked synthetic, a
manifest with a sha256 per file, and the memorization report.

Built with the standard library's ``zipfile`` into a temporary file, then moved into
the content-addressed store; the bundle's own sha256 is recorded on the export row and
checked again before every download.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from synthray import code_version
from synthray.app.evaluations.schemas import format_interval
from synthray.app.exports import privacy


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# The elements that differ between the files of one series, in tag order.
SOP_INSTANCE_UID = Tag(0x0008, 0x0018)
INSTANCE_NUMBER = Tag(0x0020, 0x0013)
PIXEL_DATA = Tag(0x7FE0, 0x0010)


def _element_bytes(elem: DataElement, encodings: list[str]) -> bytes:
    """One data element as pydicom writes it (explicit VR, little endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


@dataclass(frozen=True)
class SeriesBytes:
    """A series template already encoded by pydicom, cut around the three elements each
    file sets itself (SOP instance UID, instance number, pixel data): a file is the file
    meta, these pieces and those three elements, byte for byte what ``save_as`` writes
    for the whole dataset (the bundle test checks it), without re-encoding fifty template
    elements per image under the GIL."""

    before_uid: bytes
    before_number: bytes
    before_pixels: bytes
    encodings: list[str]

    @classmethod
    def of(cls, template: Dataset) -> SeriesBytes:
        encodings = list(template._character_set)
        parts: dict[str, list[bytes]] = {"uid": [], "number": [], "pixels": []}
        for elem in template:  # tag order
            if elem.tag in (SOP_INSTANCE_UID, INSTANCE_NUMBER, PIXEL_DATA):
                raise ValueError(f"the template sets {elem.tag}, which each file sets itself")
            where = (
                "uid" if elem.tag < SOP_INSTANCE_UID
                else "number" if elem.tag < INSTANCE_NUMBER
                else "pixels" if elem.tag < PIXEL_DATA
                else None
            )  # fmt: skip
            if where is None:
                raise ValueError(f"the template has {elem.tag} after the pixel data")
            parts[where].append(_element_bytes(elem, encodings))
        return cls(
            b"".join(parts["uid"]), b"".join(parts["number"]), b"".join(parts["pixels"]),
            encodings,
        )  # fmt: skip


@dataclass(frozen=True)
class DicomSeries:
    """What the DICOM files of one bundle share: one synthetic study, one series per class,
    UIDs under the site's organization root, the generator that made the images, and the
    attributes every file of a class carries (built once, encoded once)."""

    uid_root: str | None
    templates: dict[str, Dataset]
    encoded: dict[str, SeriesBytes]

    @classmethod
    def new(
        cls,
        classes: list[str],
        uid_root: str | None,
        generator: str,
        batch_id: int,
        shape: tuple[int, int],
    ) -> DicomSeries:
        created = dt.datetime.now(dt.UTC)
        study = generate_uid(prefix=uid_root)
        templates = {
            label: _template(label, n + 1, generate_uid(prefix=uid_root), study, created,
                             generator, batch_id, shape)
            for n, label in enumerate(classes)
        }  # fmt: skip
        encoded = {label: SeriesBytes.of(t) for label, t in templates.items()}
        return cls(uid_root=uid_root, templates=templates, encoded=encoded)


def _template(
    label: str,
    series_number: int,
    series_uid: str,
    study_uid: str,
    created: dt.datetime,
    generator: str,
    batch_id: int,
    shape: tuple[int, int],
) -> Dataset:
    """Everything but the instance: a Secondary Capture built from nothing (never from a
    training header) that says, wherever a viewer looks, that it is synthetic. The Type 2
    attributes the standard requires are present and empty where they would describe a
    patient or a visit; the study date is the bundle's."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    # Patient: no patient. The Type 2 attributes are empty; the identity fields say so.
    ds.PatientName = "SYNTHETIC^IMAGES"
    ds.PatientID = f"SYNTHETIC-BATCH-{batch_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic image: generated, derived from no patient"
    # Study and series: one study per bundle, one series per class.
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"SYN{batch_id}"[:16]
    ds.AccessionNumber = ""
    ds.StudyDescription = "SynthRay synthetic chest radiographs"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"SYNTHETIC {label}"[:64]
    ds.Modality = "OT"
    ds.BodyPartExamined = "CHEST"  # unpaired: no Laterality
    # Equipment: the generator is the capture device.
    ds.ConversionType = "SYN"
    ds.Manufacturer = "SynthRay"
    ds.SecondaryCaptureDeviceManufacturer = "SynthRay"
    ds.SecondaryCaptureDeviceManufacturerModelName = generator[:64]
    ds.SecondaryCaptureDeviceSoftwareVersions = code_version()[:64]
    # Image.
    ds.ContentDate, ds.ContentTime = date, time
    ds.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC"]
    ds.DerivationDescription = (
        f"Synthetic image sampled from generative model {generator}; not an image of a patient"
    )[:1024]
    ds.ImageComments = f"Synthetic image generated by SynthRay; label {label}; not a patient."
    ds.BurnedInAnnotation = "NO"
    ds.PatientOrientation = ["L", "F"]  # drawn as frontal chest films are displayed
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.Rows, ds.Columns = shape
    return ds


def synthetic_dicom(img: np.ndarray, *, label: str, index: int, series: DicomSeries) -> bytes:
    """One image of ``label``'s series: the series template, a fresh SOP instance UID, its
    number and pixels. ``dciodvfy`` (dicom3tools) finds no error or warning in it."""
    if img.shape != (series.templates[label].Rows, series.templates[label].Columns):
        raise ValueError(f"image of shape {img.shape} in a series of another size")
    uid = generate_uid(prefix=series.uid_root)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    enc = series.encoded[label]
    pixels = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
    return b"".join(
        (
            head.getvalue(),
            enc.before_uid,
            _element_bytes(DataElement(SOP_INSTANCE_UID, "UI", uid), enc.encodings),
            enc.before_number,
            _element_bytes(DataElement(INSTANCE_NUMBER, "IS", index + 1), enc.encodings),
            enc.before_pixels,
            _element_bytes(DataElement(PIXEL_DATA, "OB", pixels), enc.encodings),
        )
    )


def _encoded(
    img: np.ndarray, label: str, index: int, series: DicomSeries
) -> list[tuple[str, bytes, str]]:
    """(path in the zip, bytes, sha256) of an image's PNG and DICOM. Runs in a thread:
    zlib (PNG) and sha256 release the GIL, so two cores share the work."""
    stem = f"{label}/{label}_{index:06d}"
    out = []
    for kind, data in (
        ("png", png_bytes(img)),
        ("dcm", synthetic_dicom(img, label=label, index=index, series=series)),
    ):
        out.append((f"{kind}/{stem}.{kind}", data, hashlib.sha256(data).hexdigest()))
    return out


ENCODE_CHUNK = 64  # images encoded ahead of the writer at most (bounds memory)


def write_bundle(
    out: Path,
    *,
    images: np.ndarray,
    labels: np.ndarray,
    keep: np.ndarray,
    classes: list[str],
    report: dict[str, Any],
    provenance: dict[str, Any],
    privacy_card: dict[str, Any],
    utility: Utility | None = None,
    uid_root: str | None = None,
) -> dict[str, Any]:
    """Write the zip to ``out``; returns the manifest. Only ``keep`` images go in.
    ``privacy_card`` (:func:`synthray.app.exports.privacy.scorecard`) becomes PRIVACY.md and
    privacy.json. With ``utility`` (the generator's latest utility evaluation), its table
    goes into the README and its result, CSV and chart under ``utility/``."""
    files: list[dict[str, Any]] = []
    exported = {c: 0 for c in classes}
    generator = (
        f"{provenance.get('model', '?')} v{provenance.get('model_version', '?')} "
        f"({provenance.get('architecture', '?')})"
    )
    series = DicomSeries.new(
        classes,
        uid_root,
        generator,
        int(report["batch_id"]),
        (int(images.shape[1]), int(images.shape[2])),
    )
    chosen = [int(i) for i in np.flatnonzero(keep)]
    with (
        zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf,
        ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool,
    ):
        for start in range(0, len(chosen), ENCODE_CHUNK):
            part = chosen[start : start + ENCODE_CHUNK]
            labels_of = [classes[int(labels[i])] for i in part]
            encoded = pool.map(_encoded, [images[i] for i in part], labels_of, part,
                               [series] * len(part))  # fmt: skip
            for label, entries in zip(labels_of, encoded, strict=True):
                exported[label] += 1
                for name, data, sha in entries:
                    # PNG is deflated already: stored as it is, the zip costs nothing.
                    kind = zipfile.ZIP_STORED if name.endswith(".png") else zipfile.ZIP_DEFLATED
                    zf.writestr(name, data, compress_type=kind, compresslevel=1)
                    files.append({"path": name, "label": label, "sha256": sha})
        manifest = {
            "format": "synthray-export/1",
            "synthetic": True,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "code_version": code_version(),
            "classes": classes,
            "exported_per_class": exported,
            "removed_by_memorization_gate": int((~keep).sum()),
            "provenance": provenance,
            "memorization": report["summary"] | {"threshold": report["calibration"]["threshold"]},
            "utility_evaluation_id": utility.evaluation_id if utility else None,
            "files": files,
        }
        for name, data in (
            ("PRIVACY.md", privacy.markdown(privacy_card).encode()),
            ("privacy.json", json.dumps(privacy_card, indent=1).encode()),
        ):
            zf.writestr(name, data)
            files.append({"path": name, "sha256": hashlib.sha256(data).hexdigest()})
        if utility is not None:
            for name, data in (
                ("utility/evaluation.json", json.dumps(utility.result, indent=1).encode()),
                ("utility/evaluation.csv", utility.csv),
                ("utility/chart.png", utility.chart_png),
            ):
                zf.writestr(name, data)
                files.append({"path": name, "sha256": hashlib.sha256(data).hexdigest()})
        sums = [(f["sha256"], f["path"]) for f in files]
        for name, data in (
            ("manifest.json", json.dumps(manifest, indent=1).encode()),
            ("memorization_report.json", json.dumps(report, indent=1).encode()),
            ("README.txt", (README + utility_section(utility)).encode()),
        ):
            zf.writestr(name, data)
            sums.append((hashlib.sha256(data).hexdigest(), name))
        # `sha256sum -c SHA256SUMS` in the unpacked folder checks every other file.
        zf.writestr("SHA256SUMS", "".join(f"{sha}  {path}\n" for sha, path in sums))
    return manifest


@dataclass(frozen=True)
class Utility:
    """A finished utility evaluation of the generator, as stored."""

    evaluation_id: int
    result: dict[str, Any]
    csv: bytes
    chart_png: bytes


def utility_section(utility: Utility | None) -> str:
    """The README's account of what the images are good for, as measured."""
    if utility is None:
        return (
            "\nUtility: no utility evaluation of this generator version has been run, so\n"
            "nothing here says whether these images help a classifier.\n"
        )
    r = utility.result
    lineage = r.get("lineage", {})
    rows = [
        f"{'arm':10} {'balanced accuracy':28} {'accuracy':28} {'vs DS1 (bal. acc.)':28}",
    ]
    for arm in r["arms"]:
        fig = r["summary"][arm]
        rows.append(
            f"{arm:10} {format_interval(fig['balanced_accuracy']):28} "
            f"{format_interval(fig['accuracy']):28} "
            f"{format_interval(r['vs_ds1'].get(arm, {}).get('balanced_accuracy'), signed=True):28}"
        )
    seeds = len(r["seeds"])
    return (
        f"\nUtility (evaluation {utility.evaluation_id}; utility/chart.png, "
        "utility/evaluation.csv)\n"
        f"A small classifier trained {r['config']['steps']} steps on each arm, "
        f"{seeds} seed{'s' if seeds != 1 else ''} "
        f"(mean [95% interval over seeds]{'' if seeds > 1 else '; one seed: no interval'}), "
        f"scored on {r['test_images']} real images of unseen patients "
        f"({lineage.get('test_set', 'held-out patients')}).\n"
        "DS1 real as it is; DS2 real + synthetic up to the largest class; DS3 real "
        "undersampled;\nTSTR synthetic only; AUG classic augmentation; DS2-even synthetic "
        "in every class in the same\nproportion; PRE synthetic pre-training, then real "
        "fine-tuning.\n\n" + "\n".join(rows) + "\n"
    )


README = """SynthRay synthetic export

Every image in this bundle is synthetic: sampled from a generative model, not taken
from a patient. Each passed a memorization check against every training image (exact
nearest-neighbour search, threshold calibrated on held-out patients); images that
failed it were removed before this bundle was built.

png/<class>/   8-bit grey PNG images
dcm/<class>/   the same images as DICOM Secondary Capture, ConversionType SYN
manifest.json  provenance, counts, and a sha256 for every file
SHA256SUMS     the same sha256s (and the manifest's) for `sha256sum -c SHA256SUMS`
memorization_report.json  the check's policy, calibration and per-image figures
PRIVACY.md     the privacy scorecard: threat model, patient split, de-identification,
               the gate's figures, membership inference, and what they do not prove
privacy.json   the same figures for a machine
"""
