"""Unpacking an uploaded zip without trusting it.

Entries are counted before anything is written; sizes are counted as bytes are
actually extracted (a zip's declared sizes can lie), so a zip bomb stops at the limit;
absolute paths, ``..`` components, symbolic links, encrypted entries and nested
archives are refused. Errors name entries by position, never by name.
"""

from __future__ import annotations

import errno
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from synthray.app.errors import Invalid, PayloadTooLarge

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst")
ARCHIVE_MAGIC = (b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf", b"Rar!")
CHUNK = 1 << 20


def safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path an entry may be written to, or None if it is unsafe."""
    if "\\" in name or "\x00" in name:
        return None
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in {"..", ""} for part in p.parts[:-1]) or ".." in p.parts:
        return None
    if p.parts and ":" in p.parts[0]:  # a drive letter
        return None
    return p


def extract_zip(archive: Path, dest: Path, *, max_entries: int, max_total_bytes: int) -> int:
    """Extract ``archive`` into ``dest`` (which must be empty). Returns files written."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise Invalid("the upload is not a readable zip archive", field="file") from exc
    written = 0
    total = 0
    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise PayloadTooLarge(f"the zip holds more than {max_entries} entries")
        for i, info in enumerate(infos, start=1):
            if info.is_dir():
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise Invalid(f"zip entry {i} is a symbolic link", field="file")
            if info.flag_bits & 0x1:
                raise Invalid(f"zip entry {i} is encrypted", field="file")
            rel = safe_member_path(info.filename)
            if rel is None:
                raise Invalid(f"zip entry {i} has an unsafe path", field="file")
            if rel.name.lower().endswith(ARCHIVE_SUFFIXES):
                raise Invalid(
                    f"zip entry {i} is an archive; nested archives are refused", field="file"
                )
            target = dest.joinpath(*rel.parts)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("xb") as out:
                    first = True
                    for chunk in iter(lambda: src.read(CHUNK), b""):
                        if first and chunk.startswith(ARCHIVE_MAGIC):
                            raise Invalid(
                                f"zip entry {i} is an archive; nested archives are refused",
                                field="file",
                            )
                        first = False
                        total += len(chunk)
                        if total > max_total_bytes:
                            raise PayloadTooLarge(
                                f"the zip unpacks to more than {max_total_bytes} bytes"
                            )
                        out.write(chunk)
            except FileExistsError as exc:
                raise Invalid(f"zip entry {i} repeats an earlier path", field="file") from exc
            except (NotADirectoryError, IsADirectoryError) as exc:
                raise Invalid(
                    f"zip entry {i} puts a file and a folder at the same path", field="file"
                ) from exc
            except (zipfile.BadZipFile, zlib_error(), EOFError, NotImplementedError) as exc:
                raise Invalid(f"zip entry {i} is corrupt", field="file") from exc
            except OSError as exc:
                if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
                    raise Invalid(
                        f"zip entry {i} has a name this server cannot store", field="file"
                    ) from exc
                raise  # a full or failing disk is the server's problem, not the zip's
            written += 1
    return written


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
