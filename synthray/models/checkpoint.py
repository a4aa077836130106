"""safetensors file I/O for networks and training state; nothing here ever pickles.

A file holds named tensors plus one JSON document stored under the safetensors metadata key
``"synthray"``. Writes are atomic (temp file in the same folder, fsync, ``os.replace``, fsync of
the folder), so a crash leaves either the old file or the new one. safetensors rejects truncated
files and bad headers but not a flipped bit inside tensor data, so callers keep the sha256 that
:func:`save_state` returns and pass it back to :func:`load_state`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from synthray.fileio import fsync_dir, sha256_file

META_KEY = "synthray"
_TMP_SUFFIX = ".tmp"

# Tags used by flatten_state_dict in its JSON structure. A plain JSON list stays a list.
_TENSOR = "__tensor__"
_DICT = "__dict__"
_TUPLE = "__tuple__"


__all__ = [
    "ChecksumMismatch",
    "flatten_state_dict",
    "load_state",
    "save_state",
    "sha256_file",
    "unflatten_state_dict",
]


class ChecksumMismatch(ValueError):
    """The file's sha256 differs from the one recorded when it was written."""


def save_state(path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> str:
    """Atomically write ``tensors`` and the JSON ``meta`` to ``path``; return the file's sha256.

    Tensors are copied to CPU in standard (row-major) layout. ``meta`` must be JSON-serialisable.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {META_KEY: json.dumps(dict(meta), sort_keys=True)}
    data = st_save(prepared, metadata=metadata)
    digest = hashlib.sha256(data).hexdigest()

    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(folder)
    return digest


def unfinished_writes(folder: Path, name_glob: str = "*") -> list[Path]:
    """Temporary files that :func:`save_state` leaves in ``folder`` when a process dies
    mid-write, for target names matching ``name_glob`` (a finished write renames its own)."""
    return list(Path(folder).glob(f".{name_glob}.*{_TMP_SUFFIX}"))


def _read_meta(data: bytes) -> dict[str, Any]:
    """The synthray JSON document from a safetensors header (8-byte length, then JSON)."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        return {}
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError(f"metadata key {META_KEY!r} does not hold a JSON object")
    return meta


def load_state(
    path: Path, expected_sha256: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_state`: (tensors on CPU, meta).

    The file is read once; when ``expected_sha256`` is given, those bytes are hashed and
    :class:`ChecksumMismatch` is raised before anything is parsed if the hash differs.
    """
    path = Path(path)
    data = path.read_bytes()
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise ChecksumMismatch(
                f"sha256 of {path} is {actual}, expected {expected_sha256}: "
                "the file was changed or corrupted after it was written"
            )
    tensors = st_load(data)  # validates the header and tensor extents
    return tensors, _read_meta(data)


def _encode_key(key: Any) -> Any:
    if key is None or isinstance(key, str | int | float | bool):
        return key
    raise TypeError(f"state dict key {key!r} of type {type(key).__name__} is not supported")


def flatten_state_dict(
    sd: Mapping[Any, Any], prefix: str = ""
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a nested state dict into named tensors and a JSON-able structure.

    Handles what ``Optimizer.state_dict()`` and module state dicts contain: dicts with str or
    int keys, lists, tuples, tensors (including 0-d ones such as Adam's ``step``), ints, floats,
    bools, strings and None. Tensors are named ``prefix`` + their dotted path. Restore with
    :func:`unflatten_state_dict`; key types, tuples and scalar types come back exactly.
    """
    tensors: dict[str, Tensor] = {}

    def name_for(path: list[str]) -> str:
        base = prefix + ".".join(path)
        name, n = base, 1
        while name in tensors:  # a key containing "." could collide with a nested path
            name = f"{base}#{n}"
            n += 1
        return name

    def enc(value: Any, path: list[str]) -> Any:
        if isinstance(value, Tensor):
            name = name_for(path)
            tensors[name] = value
            return {_TENSOR: name}
        if isinstance(value, Mapping):
            return {_DICT: [[_encode_key(k), enc(v, [*path, str(k)])] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {_TUPLE: [enc(v, [*path, str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, [*path, str(i)]) for i, v in enumerate(value)]
        if value is None or isinstance(value, str | int | float | bool):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {'.'.join(path) or '<root>'}")

    return tensors, enc(sd, [])


def unflatten_state_dict(tensors: Mapping[str, Tensor], structure: Any) -> Any:
    """Inverse of :func:`flatten_state_dict`."""

    def dec(node: Any) -> Any:
        if isinstance(node, dict):
            if _TENSOR in node:
                name = node[_TENSOR]
                if name not in tensors:
                    raise KeyError(f"tensor {name!r} missing from the stored state")
                return tensors[name]
            if _DICT in node:
                return {k: dec(v) for k, v in node[_DICT]}
            if _TUPLE in node:
                return tuple(dec(v) for v in node[_TUPLE])
            raise ValueError(f"unrecognised node in stored structure: {sorted(node)}")
        if isinstance(node, list):
            return [dec(v) for v in node]
        return node

    return dec(structure)
