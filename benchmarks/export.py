"""Building and downloading an export bundle of 5,000 synthetic 256 x 256 images, beside
plain `zip` (Info-ZIP, default level) of the same PNG and DICOM files, in the same run.

- ours, build: ``bundle.write_bundle`` from the image arrays (PNG and DICOM encoding,
  the manifest, the scorecard, SHA256SUMS, the zip), as the export job runs it;
- reference: the same PNG and DICOM files, already on disk, zipped with `zip -q -r`;
- ours, download: the bundle stored and registered as an approved export, served by the
  real API (uvicorn, one process) and streamed by a partner with httpx; the API
  process's peak resident memory (VmHWM) before and after the download is reported.

The images are NIH reference films upscaled to 256 px with a little noise (realistic
content for the PNG and deflate coders); the bundle is written exactly as the export job
writes it. Prints a table, then one JSON line. Target: build at most 1.5x the `zip` time.
Usage: python benchmarks/export.py   (SYNTHRAY_BENCH_IMAGES overrides the 5,000)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CLASSES = ["Normal", "Effusion", "Cardiomegaly"]


def images(n: int) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F  # noqa: N812
    from support import load_nih

    films, _ = load_nih()
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(films), n)
    out = np.empty((n, 256, 256), dtype=np.uint8)
    for i in range(0, n, 500):
        x = torch.from_numpy(films[pick[i : i + 500]].astype(np.float32)).unsqueeze(1)
        up = F.interpolate(x, size=256, mode="bilinear", align_corners=False)[:, 0].numpy()
        up += rng.normal(0, 3, up.shape)
        out[i : i + 500] = np.clip(up, 0, 255).astype(np.uint8)
    return out, rng.integers(0, len(CLASSES), n)


def build(out: Path, x: np.ndarray, y: np.ndarray) -> dict:
    from synthray.app.exports import bundle

    report = {
        "batch_id": 1,
        "summary": {"images": len(x), "flagged": 0, "passed": True},
        "calibration": {"threshold": 0.97},
    }
    from synthray.app.exports import privacy

    # PRIVACY.md needs a whole scorecard (a registered generator's audit); a placeholder
    # stands in here: one small text file next to 10,000 images.
    card = {"note": "benchmark"}
    original = privacy.markdown
    privacy.markdown = lambda card: "benchmark bundle: no scorecard\n"
    try:
        return bundle.write_bundle(
            out,
            images=x,
            labels=y,
            keep=np.ones(len(x), dtype=bool),
            classes=CLASSES,
            report=report,
            provenance={"model": "bench", "model_version": 1, "architecture": "latentflow"},
            privacy_card=card,
        )
    finally:
        privacy.markdown = original


def unpack(bundle_path: Path, folder: Path) -> None:
    import zipfile

    with zipfile.ZipFile(bundle_path) as zf:
        for name in zf.namelist():
            if name.startswith(("png/", "dcm/")):
                zf.extract(name, folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def register(data: Path, url: str, bundle_path: Path) -> tuple[int, str]:
    """Rows for an approved export of the bundle (as the pipeline would leave them)."""
    from support import make_keys

    from synthray.app import storecheck
    from synthray.app.batches.tables import SyntheticBatch
    from synthray.app.datasets.tables import Dataset, DatasetVersion
    from synthray.app.db import session_scope, utcnow
    from synthray.app.exports.tables import Export
    from synthray.app.jobs.tables import Job
    from synthray.app.registry.tables import ModelVersion, RegisteredModel
    from synthray.app.storage import BlobStore
    from synthray.config import Settings
    from synthray.migrations import upgrade

    upgrade(url)
    settings = Settings(dev_mode=True, data_dir=data, database_url=url)
    storecheck.ensure(url, settings.blob_dir)  # as the first `synthray serve` would
    keys = make_keys(settings)
    sha, size = BlobStore(settings.blob_dir).put_file(bundle_path)
    with session_scope(url) as s:
        d = Dataset(name="bench")
        s.add(d)
        s.flush()
        dv = DatasetVersion(dataset_id=d.id, version=1, state="ready")
        m = RegisteredModel(name="bench")
        job = Job(id=str(uuid.uuid4()), kind="train", queue="gpu", state="succeeded", params={})
        s.add_all([dv, m, job])
        s.flush()
        mv = ModelVersion(
            model_id=m.id,
            version=1,
            dataset_version_id=dv.id,
            dataset_sha256="0" * 64,
            architecture="latentflow",
            code_version="bench",
            train_job_id=job.id,
            blob_sha256="0" * 64,
            size_bytes=0,
        )
        s.add(mv)
        s.flush()
        b = SyntheticBatch(model_version_id=mv.id, state="passed")
        s.add(b)
        s.flush()
        e = Export(
            batch_id=b.id,
            partner="partner-a",
            state="approved",
            bundle_sha256=sha,
            size_bytes=size,
            approved_at=utcnow(),
        )
        s.add(e)
        s.flush()
        return e.id, keys.partner


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def download(data: Path, url: str, export_id: int, key: str, expect_sha: str) -> dict:
    import httpx

    port = free_port()
    env = os.environ | {
        "SYNTHRAY_DEV_MODE": "true",
        "SYNTHRAY_DATA_DIR": str(data),
        "SYNTHRAY_DATABASE_URL": url,
        "SYNTHRAY_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "synthray.cli.main", "serve", "--port", str(port),
         "--no-with-worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            assert proc.poll() is None, "the API did not start"
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        before = peak_rss_mib(proc.pid)
        digest, size = hashlib.sha256(), 0
        t0 = time.perf_counter()
        with httpx.stream(
            "GET",
            f"{base}/v1/exports/{export_id}/download",
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        ) as r:
            assert r.status_code == 200, r.read()
            for chunk in r.iter_bytes(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        seconds = time.perf_counter() - t0
        assert digest.hexdigest() == expect_sha
        peak = peak_rss_mib(proc.pid)
        return {"seconds": seconds, "bytes": size, "rss_before": before, "rss_peak": peak}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    n = int(os.environ.get("SYNTHRAY_BENCH_IMAGES", "5000"))
    assert shutil.which("zip"), "Info-ZIP `zip` is needed (apt-get install zip)"
    tmp = Path(tempfile.mkdtemp(prefix="synthray-export-bench-"))
    try:
        x, y = images(n)
        ours = tmp / "bundle.zip"
        t0 = time.perf_counter()
        build(ours, x, y)
        build_s = time.perf_counter() - t0
        files = tmp / "files"
        unpack(ours, files)
        ref_zip = tmp / "reference.zip"
        t0 = time.perf_counter()
        subprocess.run(["zip", "-q", "-r", str(ref_zip), "png", "dcm"], cwd=files, check=True)
        zip_s = time.perf_counter() - t0
        sha = hashlib.sha256(ours.read_bytes()).hexdigest()
        data = tmp / "data"
        url = f"sqlite:///{tmp / 'bench.db'}"
        export_id, key = register(data, url, ours)
        dl = download(data, url, export_id, key, sha)
        mib = ours.stat().st_size / 2**20
        print(f"{n} images of 256 x 256, bundle {mib:.0f} MiB, reference zip "
              f"{ref_zip.stat().st_size / 2**20:.0f} MiB")  # fmt: skip
        print(f"{'step':32}{'seconds':>10}")
        print(f"{'ours: build the bundle':32}{build_s:>10.1f}")
        print(f"{'reference: zip -r the files':32}{zip_s:>10.1f}")
        print(f"{'ours: download (stream)':32}{dl['seconds']:>10.1f}  "
              f"({mib / dl['seconds']:.0f} MiB/s)")  # fmt: skip
        print(f"API peak RSS: {dl['rss_before']:.0f} MiB before the download, "
              f"{dl['rss_peak']:.0f} MiB after it (bundle {mib:.0f} MiB)")  # fmt: skip
        print(
            json.dumps(
                {
                    "benchmark": "export",
                    "value": round(build_s, 2),
                    "unit": f"s to build a bundle of {n} 256x256 images (PNG + DICOM)",
                    "reference": "zip -q -r of the same PNG and DICOM files (Info-ZIP)",
                    "reference_value": round(zip_s, 2),
                    "ratio": round(build_s / zip_s, 3),
                    "target": 1.5,
                    "download_seconds": round(dl["seconds"], 2),
                    "download_mib_per_s": round(mib / dl["seconds"], 1),
                    "api_peak_rss_mib_before": round(dl["rss_before"], 1),
                    "api_peak_rss_mib_after": round(dl["rss_peak"], 1),
                    "bundle_mib": round(mib, 1),
                }
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
