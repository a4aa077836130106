"""Rows of a stored array read in place (the staff pages' nearest-training-image thumbnails)
equal the rows of the whole array; a compressed or damaged array file is handled."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from synthray.app.storage import BlobCorrupt, BlobNotFound, BlobStore


@pytest.mark.parametrize("shape", [(300, 64, 64), (40, 128, 128), (5, 3)])
def test_rows_in_place_equal_the_whole_array(tmp_path: Path, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    store = BlobStore(tmp_path)
    a = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels = rng.integers(0, 5, size=shape[0])
    sha, _ = store.put_arrays(images_64=a, labels=labels)
    want = [shape[0] - 1, 0, 3, 3, -1, shape[0], 2]  # repeats and rows that do not exist
    got = store.array_rows(sha, "images_64", want)
    assert sorted(got) == [0, 2, 3, shape[0] - 1]
    whole = store.get_arrays(sha)["images_64"]
    for r, row in got.items():
        assert row.dtype == a.dtype and np.array_equal(row, whole[r])
    assert got[3].flags.writeable  # a copy, not a view of the mapped file
    labels_got = store.array_rows(sha, "labels", [1, 4])
    assert labels_got[1] == labels[1] and labels_got[4] == labels[4]


def test_compressed_archives_are_read_whole(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    a = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    buf = io.BytesIO()
    np.savez_compressed(buf, images_8=a)
    sha, _ = store.put_bytes(buf.getvalue())
    assert np.array_equal(store.array_rows(sha, "images_8", [1])[1], a[1])


def test_missing_damaged_and_unknown(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha, _ = store.put_arrays(images_64=np.zeros((50, 64, 64), dtype=np.uint8))
    with pytest.raises(BlobCorrupt):
        store.array_rows(sha, "images_128", [0])  # no such array
    with pytest.raises(BlobNotFound):
        store.array_rows("0" * 64, "images_64", [0])
    path = store.path(sha)
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(data[: len(data) // 2])  # cut in the middle of the pixels
    with pytest.raises(BlobCorrupt):
        store.array_rows(sha, "images_64", [49])
    other, _ = store.put_bytes(b"not an archive at all")
    with pytest.raises(BlobCorrupt):
        store.array_rows(other, "images_64", [0])
