"""Hostile and broken input: header bombs, malformed files, zip attacks, big uploads.
Each is refused with a reason; nothing escapes as a 500."""

from __future__ import annotations

import contextlib
import io
import json
import resource
import stat
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import make_dicom
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SHARED_DATA, Keys, auth, upload_spec

from synthray.app.datasets.decode import DecodeOptions, Rejected, decode_bytes
from synthray.app.datasets.pool import DecodePool
from synthray.config import Settings

OPTS = DecodeOptions(sizes=(64,), secret="s" * 32)


def _tiny_bomb(tmp: Path) -> bytes:
    """A valid little file whose header claims 65535 x 65535 x 1000 frames of 16 bits."""
    path = tmp / "bomb.dcm"
    make_dicom(path, 1, np.zeros((4, 4), dtype=np.uint16))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    ds.save_as(path)
    return path.read_bytes()


def test_header_bomb_rejected_before_decoding(tmp_path: Path) -> None:
    data = _tiny_bomb(tmp_path)
    assert len(data) < 10_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(Rejected, match="claims more pixel data than the limit"):
        decode_bytes(data, OPTS)
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew_kib < 200_000


def test_memory_cap_kills_only_the_decoder(tmp_path: Path) -> None:
    """With a low address-space cap the child fails; the pool reports it and goes on."""
    good = tmp_path / "good.dcm"
    make_dicom(good, 2, np.full((512, 512), 1000, dtype=np.uint16))
    with DecodePool(1, 0) as pool:
        ok = list(pool.map([str(good)], DecodeOptions(sizes=(64,), secret="s" * 32), 1 << 30))
    assert ok[0][0] is not None
    # 1.2 GiB of pixels under a 1 GiB cap: refused by the header check...
    with DecodePool(1, 1 << 30) as pool:
        big = tmp_path / "big.dcm"
        make_dicom(big, 3, np.zeros((8, 8), dtype=np.uint16))
        import pydicom

        ds = pydicom.dcmread(big)
        ds.Rows, ds.Columns = 24000, 24000
        ds.PixelData = b"\x00" * 16  # lies about its size
        ds.save_as(big)
        opts = DecodeOptions(sizes=(64,), secret="s" * 32, max_pixel_bytes=4 << 30)
        # ...so raise the header limit and let the memory cap catch it instead.
        out = list(pool.map([str(big), str(good)], opts, 1 << 30))
    assert out[0][0] is None and out[0][1]
    assert out[1][0] is not None  # the next file still decodes


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"DICM",
        b"\x00" * 128 + b"DICM" + b"\xff" * 64,
        b"\x89PNG\r\n\x1a\n garbage",
        b"\xff\xd8\xff\xe0 truncated jpeg",
        b"random text, not an image at all",
    ],
)
def test_garbage_is_rejected(data: bytes) -> None:
    with pytest.raises(Rejected):
        decode_bytes(data, OPTS)


FUZZ_SEEDS = ["CR-MONO1-10-chest.dcm", "chrJapMulti.dcm", "RG1_J2KR.dcm", "siim_Fake_MONOHR1.dcm"]
_fuzz_stats = {"iterations": 0}


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    seed=st.sampled_from(FUZZ_SEEDS),
    edits=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=8)), max_size=6),
    cut=st.one_of(st.none(), st.floats(0.05, 1.0)),
)
def test_fuzz_mutated_real_files_never_escape(seed: str, edits: list, cut: float | None) -> None:
    """Byte-level mutations of real files: decoding ends in pixels or a Rejected, never in
    another exception, and memory stays bounded."""
    data = bytearray((SHARED_DATA / "dicom" / seed).read_bytes()[:2_000_000])
    for where, payload in edits:
        pos = int(where * (len(data) - 1))
        data[pos : pos + len(payload)] = payload
    if cut is not None:
        data = data[: max(1, int(len(data) * cut))]
    with contextlib.suppress(Rejected):
        decode_bytes(bytes(data), OPTS)
    _fuzz_stats["iterations"] += 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4_000_000  # KiB


def test_fuzz_ran() -> None:
    """The fuzz test above really ran its examples (it runs first: file order)."""
    print(f"fuzz iterations: {_fuzz_stats['iterations']}")
    assert _fuzz_stats["iterations"] >= 150


# ------------------------------------------------------------------------------ uploads


def _zip(entries: list[tuple[str, bytes]], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _post(client: TestClient, key: str, data: bytes, spec: str | None = None):
    return client.post(
        "/v1/datasets/upload",
        files={"file": ("upload.zip", data, "application/zip")},
        data={"spec": spec or upload_spec()},
        headers=auth(key),
    )


def test_zip_attacks_are_refused(client: TestClient, keys: Keys, settings: Settings) -> None:
    op = keys.operator
    cases = {
        "unsafe path": _zip([("../../evil.dcm", b"x")]),
        "symbolic link": _zip([("a.dcm", b"x")], symlink="link.dcm"),
        "nested": _zip([("inner.zip", _zip([("a.dcm", b"x")]))]),
        "nested by content": _zip([("inner.bin", _zip([("a.dcm", b"x")]))]),
        "a file, then a folder of the same name": _zip([("a", b"x"), ("a/b.png", b"y")]),
        "a folder, then a file of the same name": _zip([("a/b.png", b"y"), ("a", b"x")]),
        "a name longer than the filesystem takes": _zip([("x" * 300 + ".png", b"y")]),
        "a path component longer than that": _zip([("d" * 300 + "/b.png", b"y")]),
    }
    for reason, data in cases.items():
        r = _post(client, op, data)
        assert r.status_code == 422, (reason, r.text)
        assert r.json()["field"] == "file"
    r = _post(client, op, b"PK\x03\x04 this is not really a zip")
    assert r.status_code == 422
    # Nothing is left behind in the upload area.
    uploads = settings.work_dir / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())


def test_zip_bomb_stops_at_the_limit(client: TestClient, keys: Keys, settings: Settings) -> None:
    settings.max_unpacked_bytes = 5_000_000
    bomb = _zip([("a.dcm", b"\x00" * 20_000_000)])
    assert len(bomb) < 100_000
    r = _post(client, keys.operator, bomb)
    assert r.status_code == 413 and "unpacks to more than" in r.json()["detail"]


def test_zip_bomb_stops_at_a_multiple_of_its_size(
    client: TestClient, keys: Keys, settings: Settings
) -> None:
    """Far below the absolute unpacked limit (8 GiB by default), a highly compressed zip
    stops at max_zip_ratio times its size, or 64 MiB, whichever is more."""
    bomb = _zip([("a.dcm", b"\x00" * 70_000_000)])
    assert len(bomb) * settings.max_zip_ratio < 64 * 1024**2 < settings.max_unpacked_bytes
    r = _post(client, keys.operator, bomb)
    assert r.status_code == 413, r.text
    assert f"unpacks to more than {64 * 1024**2} bytes" in r.json()["detail"]
    assert not any((settings.work_dir / "uploads").iterdir())


def test_upload_size_limit_and_form(client: TestClient, keys: Keys, settings: Settings) -> None:
    settings.max_upload_bytes = 50_000
    r = _post(client, keys.operator, b"\x00" * 60_000)
    assert r.status_code == 413
    r = client.post("/v1/datasets/upload", json={"x": 1}, headers=auth(keys.operator))
    assert r.status_code == 422
    r = _post(client, keys.operator, _zip([("a.dcm", b"x")]), spec='{"name": "x"}')
    assert r.status_code == 422 and r.json()["field"].startswith("spec")
    r = _post(client, keys.partner, _zip([("a.dcm", b"x")]))
    assert r.status_code == 403


def test_single_file_upload_is_ingested(
    client: TestClient, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """One DICOM upload, labels from a DICOM attribute: too few patients, so the job
    fails with a clear reason, and the uploaded file is gone afterwards."""
    from support import run_queued

    path = tmp_path / "one.dcm"
    make_dicom(path, 7, np.full((64, 64), 900, dtype=np.uint16))
    r = client.post(
        "/v1/datasets/upload",
        files={"file": ("x.dcm", path.read_bytes(), "application/dicom")},
        data={"spec": upload_spec(label_map={"PHIstudydesc0007": "A"})},
        headers=auth(keys.operator),
    )
    assert r.status_code == 202, r.text
    t0 = time.monotonic()
    assert run_queued(settings) == ["failed"]
    job = client.get(f"/v1/jobs/{r.json()['job_id']}", headers=auth(keys.operator)).json()
    assert "classes with no image" in job["error"] or "two patients" in job["error"]
    assert "PHI" not in json.dumps([job["error"], job["result"], job["progress"]])
    assert not any((settings.work_dir / "uploads").iterdir())
    assert time.monotonic() - t0 < 60
