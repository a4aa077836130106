"""Durable file helpers shared by the blob store (``app``) and the weight files (``models``).

A write that must survive a crash goes to a temporary file in the target folder, is fsynced,
renamed over the target and the folder is fsynced (:func:`fsync_dir`), so a reader sees the
old file or the whole new one. Imports nothing but the standard library.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
