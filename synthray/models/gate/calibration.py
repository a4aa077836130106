"""The gate's calibration, kept on disk and reused while nothing it depends on changes.

Calibrating the gate (:func:`synthray.models.gate.memorization.calibrate`) scores every
held-out image against every training image in each space: as much work as checking as many
synthetic images, and the same for every check against one dataset version. The
calibration depends only on the training and held-out images, the copy-detection embedding
and the check's parameters, so it is stored in a file named by a SHA-256 key over exactly
those: the bytes of both image arrays, the embedding's SHA-256, the parameters, the source of
the gate's modules and the versions of torch and numpy. Any change to any of them gives
another key, so a stale calibration is never read; a file that cannot be read is computed
again and replaced. Files are written under a temporary name and renamed, so a crash leaves
either the whole file or none.

The files hold scores and embeddings derived from the site's images (no images, no patient
keys); they live under the data directory with everything else and can be deleted at any
time (the next check computes them again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthray.models.gate.memorization import Calibration

log = logging.getLogger(__name__)

# What a calibration is computed by: a change to any of these modules invalidates every key.
_SOURCES = (
    "memorization.py",
    "pixelmatch.py",
    "correlation.py",
    "register.py",
    "search.py",
    "imageops.py",
    "copydetect.py",
)
_FORMAT = 1
# What reading a damaged or foreign file raises.
UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _code_fingerprint() -> str:
    """The gate modules' source (the package version where an install ships none)."""
    from synthray import __version__

    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _SOURCES:
        h.update(name.encode())
        try:
            h.update((here / name).read_bytes())
        except OSError:
            h.update(f"no source; synthray {__version__}".encode())
    h.update(f"torch {torch.__version__} numpy {np.__version__} format {_FORMAT}".encode())
    return h.hexdigest()


def cache_key(
    train: np.ndarray, holdout: np.ndarray, embedder_sha256: str | None, params: dict
) -> str:
    """SHA-256 hex key of everything a calibration depends on."""
    h = hashlib.sha256()
    for arr in (train, holdout):
        a = np.ascontiguousarray(arr)
        h.update(f"{a.dtype.str} {a.shape}".encode())
        h.update(a.data.cast("B"))
    h.update(json.dumps({"embedder": embedder_sha256, **params}, sort_keys=True).encode())
    h.update(_code_fingerprint().encode())
    return h.hexdigest()


def save(path: Path, calibration: Calibration) -> None:
    """Write ``calibration`` to ``path`` atomically (temporary file, fsync, rename)."""
    arrays: dict[str, Any] = {f"holdout/{k}": v for k, v in calibration.holdout_scores.items()}
    if calibration.train_embeddings is not None:
        arrays["train_embeddings"] = calibration.train_embeddings
    arrays["params"] = np.frombuffer(json.dumps(calibration.params).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> Calibration:
    """Read a file written by :func:`save` (one of ``UNREADABLE`` if it is not one)."""
    with np.load(path, allow_pickle=False) as z:
        params = json.loads(bytes(z["params"]).decode())
        scores = {
            k.split("/", 1)[1]: z[k].astype(np.float32) for k in z.files if k.startswith("holdout/")
        }
        emb = z["train_embeddings"].astype(np.float32) if "train_embeddings" in z.files else None
    if list(scores) != params["spaces"]:
        raise ValueError("calibration file's spaces do not match its parameters")
    if any(v.shape != (params["holdout"],) for v in scores.values()):
        raise ValueError("calibration file's scores do not match its parameters")
    if emb is not None and emb.shape[0] != params["train"]:
        raise ValueError("calibration file's embeddings do not match its parameters")
    return Calibration(holdout_scores=scores, train_embeddings=emb, params=params)


def cached(
    directory: Path, key: str, compute: Callable[[], Calibration]
) -> tuple[Calibration, bool]:
    """The calibration stored under ``key`` in ``directory``, else ``compute()`` stored there.

    Returns it and whether it was reused.
    """
    path = directory / f"{key}.npz"
    if path.exists():
        try:
            return load(path), True
        except UNREADABLE as e:
            # The file's name is a hash; the exception's type says enough (no messages logged).
            log.warning(
                "gate calibration %s unreadable (%s); computing it again",
                key[:12],
                type(e).__name__,
            )
    calibration = compute()
    save(path, calibration)
    return calibration, False
