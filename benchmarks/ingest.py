"""Ingest throughput against bare pydicom on the same files, in the same run.

Writes two corpora of realistic DICOM files (reference NIH radiographs upscaled to
2000 x 2000, 16-bit, with planted identifiers): uncompressed, and JPEG 2000 lossless as
PACS exports usually are. On each it times:

- reference: ``pydicom.dcmread(path).pixel_array`` for every file, one process;
- ours: the real ingest job (decode in child processes, de-identify, window, resize to
  64/128/256, dedupe, split by patient, store the version), run by the worker's code.

The JSON line reports the JPEG 2000 corpus, where decoding dominates, and the ratio on
uncompressed files beside it: there pydicom only copies bytes, and our windowing,
resizing and de-identification cost more than its whole decode.
Prints a table, then one JSON line. Target: ours >= 0.7 x the reference.
Usage: python benchmarks/ingest.py [--files 200] [--j2k-files 100] [--size 2000]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _write_corpus(folder: Path, n: int, size: int, pngs: list[Path], compress: bool) -> None:
    import pydicom
    from dicom_factory import load_pixels, make_dicom
    from pydicom.uid import JPEG2000Lossless

    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        px = load_pixels(pngs[i % len(pngs)], size)
        px = (px.astype(np.int32) + i % 7).clip(0, 4095).astype(np.uint16)  # no duplicates
        path = folder / f"f{i:05d}.dcm"
        make_dicom(path, i + 1, px, patient=i // 4 + 1)
        if compress:
            ds = pydicom.dcmread(path)
            ds.compress(JPEG2000Lossless)
            ds.save_as(path)
        rows.append({"file": path.name, "label": ["A", "B"][i % 2]})
    with (folder / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "label"])
        w.writeheader()
        w.writerows(rows)


def _measure(tmp: Path, name: str) -> tuple[int, float, float]:
    """(files, seconds for bare pydicom, seconds for our ingest job) on one corpus."""
    import pydicom

    from synthray.app.auth.schemas import Role
    from synthray.app.auth.service import create_key
    from synthray.app.datasets.schemas import DatasetCreate
    from synthray.app.datasets.service import request_ingest
    from synthray.app.db import session_scope
    from synthray.config import Settings
    from synthray.migrations import upgrade
    from synthray.workers.runner import run

    files = sorted((tmp / "import" / name).glob("*.dcm"))
    for p in files:  # warm the page cache for both
        p.read_bytes()
    t0 = time.perf_counter()
    for p in files:
        pydicom.dcmread(p).pixel_array  # noqa: B018
    ref_s = time.perf_counter() - t0

    settings = Settings(dev_mode=True, data_dir=tmp / f"data-{name}", import_root=tmp / "import")
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.sqlalchemy_url)
    spec = DatasetCreate(
        name=name,
        source=name,
        file_column="file",
        label_column="label",
        patient_column=None,
        classes=["A", "B"],
        resolutions=[64, 128, 256],
    )
    with session_scope(settings.sqlalchemy_url) as s:
        key = create_key(s, settings.secret_key, "bench", Role.operator)
        job_id = request_ingest(s, settings, spec, key.id).job_id
    t0 = time.perf_counter()
    state = run(job_id, settings)
    ours_s = time.perf_counter() - t0
    assert state == "succeeded", state
    return len(files), ref_s, ours_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200, help="uncompressed files")
    ap.add_argument("--j2k-files", type=int, default=100, help="JPEG 2000 lossless files")
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/nih-cxr14-64")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="synthray-bench-"))
    pngs = sorted((args.data / "images").glob("*.png"))
    t0 = time.perf_counter()
    _write_corpus(tmp / "import" / "raw", args.files, args.size, pngs, compress=False)
    _write_corpus(tmp / "import" / "j2k", args.j2k_files, args.size, pngs, compress=True)
    print(f"wrote the corpora in {time.perf_counter() - t0:.0f} s ({args.size}px, 16-bit)")

    results = {name: _measure(tmp, name) for name in ("raw", "j2k")}
    print(f"{'corpus':14}{'files':>6}{'bare pydicom/s':>16}{'ingest/s':>10}{'ratio':>8}")
    for name, (n, ref_s, ours_s) in results.items():
        print(f"{name:14}{n:>6}{n / ref_s:>16.1f}{n / ours_s:>10.1f}{ref_s / ours_s:>8.2f}")
    print(f"cores: {os.cpu_count()}; ingest decodes in one child process per core")
    n, ref_s, ours_s = results["j2k"]
    _, rref, rours = results["raw"]
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "value": round(n / ours_s, 2),
                "unit": "files/s (2000x2000 16-bit JPEG 2000 lossless DICOM)",
                "reference": "pydicom.dcmread + pixel_array (1 process)",
                "reference_value": round(n / ref_s, 2),
                "ratio": round(ref_s / ours_s, 3),
                "target": 0.7,
                "uncompressed_ratio": round(rref / rours, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
