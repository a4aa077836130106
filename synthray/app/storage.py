"""Content-addressed blob store on the local filesystem.

Blobs are named by the sha256 of their bytes (``ab/cdef...``). A write goes to a
temporary file in the same folder, is fsynced, renamed into place and the folder is
fsynced, so a crash leaves either the old state or the whole new blob, never half a
file. Reads can verify the hash, so a changed file is refused rather than served.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from synthray.fileio import fsync_dir, sha256_file

CHUNK = 1 << 20


class BlobNotFound(LookupError):
    pass


class BlobCorrupt(ValueError):
    pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def writable(folder: Path, min_free_bytes: int) -> str:
    """ "ok" when ``folder`` takes a synced write and has ``min_free_bytes`` left, else why
    not (for /readyz: a full or read-only disk fails every job that writes a blob)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ready-")
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        st = os.statvfs(folder)
    except OSError as exc:
        return f"unavailable ({errno.errorcode.get(exc.errno or 0, type(exc).__name__)})"
    free = st.f_bavail * st.f_frsize
    if free < min_free_bytes:
        return f"unavailable (only {free // 1024**2} MiB free, below {min_free_bytes // 1024**2})"
    return "ok"


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise BlobNotFound("not a sha256 digest")
        return self.root / sha256[:2] / sha256[2:]

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_stream(self, stream: BinaryIO) -> tuple[str, int]:
        """Copy a stream into the store; returns (sha256, size)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in iter(lambda: stream.read(CHUNK), b""):
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest = h.hexdigest()
            final = self.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                os.unlink(tmp)
            else:
                os.replace(tmp, final)
                fsync_dir(final.parent)
            return digest, size
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        return self.put_stream(io.BytesIO(data))

    def put_file(self, path: Path) -> tuple[str, int]:
        with path.open("rb") as f:
            return self.put_stream(f)

    def open_verified(self, sha256: str) -> Path:
        """Return the blob's path after checking that its bytes still hash to its name."""
        p = self.path(sha256)
        if not p.is_file():
            raise BlobNotFound(f"blob {sha256[:12]} is missing")
        if sha256_file(p) != sha256:
            raise BlobCorrupt(f"blob {sha256[:12]} does not match its hash; refusing to use it")
        return p

    def read_bytes(self, sha256: str) -> bytes:
        return self.open_verified(sha256).read_bytes()

    # numpy arrays: stored as .npz without pickles, read back with allow_pickle=False
    def put_arrays(self, **arrays: np.ndarray) -> tuple[str, int]:
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return self.put_bytes(buf.getvalue())

    def array_rows(self, sha256: str, name: str, rows: list[int]) -> dict[int, np.ndarray]:
        """``{r: get_arrays(sha256)[name][r]}`` for the ``rows`` that exist (along the first
        axis), without reading the rest: the array is mapped in place inside the
        uncompressed .npz and only those rows are copied out. For pages that show a few
        images of a large dataset; nothing is verified against the blob's hash here (the
        jobs that train or gate on the images read them with :meth:`get_arrays`, which
        is)."""
        p = self.path(sha256)
        if not p.is_file():
            raise BlobNotFound(f"blob {sha256[:12]} is missing")
        try:
            with zipfile.ZipFile(p) as zf:
                info = zf.getinfo(f"{name}.npy")
                if info.compress_type != zipfile.ZIP_STORED:
                    with zf.open(info) as f:
                        whole = np.load(f, allow_pickle=False)
                    return {r: whole[r] for r in rows if 0 <= r < len(whole)}
                with zf.open(info) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, fortran, dtype = read(f)
                    header = f.tell()
            with p.open("rb") as raw:  # the member's local header: 30 bytes, name, extra
                raw.seek(info.header_offset)
                local = raw.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise BlobCorrupt(f"blob {sha256[:12]} is not a readable array file")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len + header
        except (zipfile.BadZipFile, KeyError, ValueError) as exc:
            raise BlobCorrupt(f"blob {sha256[:12]} is not a readable array file") from exc
        if fortran or dtype.hasobject or not shape:
            raise BlobCorrupt(f"blob {sha256[:12]}: {name} cannot be read in place")
        if start + int(np.prod(shape)) * dtype.itemsize > p.stat().st_size:
            raise BlobCorrupt(f"blob {sha256[:12]} is shorter than its array")
        keep = sorted({r for r in rows if 0 <= r < shape[0]})
        if not keep:
            return {}
        mapped = np.memmap(p, dtype=dtype, mode="r", offset=start, shape=shape)
        try:
            picked = np.array(mapped[np.asarray(keep, dtype=np.int64)])
        finally:
            del mapped
        return dict(zip(keep, picked, strict=True))

    def get_arrays(self, sha256: str) -> dict[str, np.ndarray]:
        data = self.read_bytes(sha256)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
