"""The blob store when the disk refuses a write: the write fails with the OS's error,
and nothing half-written stays behind (no blob under its name, no temporary file).
The refusal is real: the writing process runs under a file-size limit (RLIMIT_FSIZE),
which makes the kernel fail the write with EFBIG, as a full disk fails it with ENOSPC."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WRITER = """
import errno, resource, signal, sys
from pathlib import Path
from synthray.app.storage import BlobStore

store = BlobStore(Path(sys.argv[1]))
small, _ = store.put_bytes(b"fits")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    store.put_bytes(b"x" * (4 << 20))
except OSError as exc:
    print(errno.errorcode[exc.errno], small)
else:
    print("written", small)
"""


def test_a_refused_write_leaves_nothing_behind(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    out = subprocess.run(
        [sys.executable, "-c", WRITER, str(root)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "EFBIG", out
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == [f"{out[1][:2]}/{out[1][2:]}"]  # only the blob that fitted
