"""The gate's calibration, kept on disk and reused while nothing it depends on changes.

Calibrating the gate (:func:`synthray.models.gate.memorization.calibrate`) scores every
held-out image against every training image in each space, and every training image against
the others (the training side of the authenticity figure): the same for every check against
one dataset version. The calibration depends only on the training and held-out images, the
copy-detection embedding and the check's parameters, so it is stored in a file named by a
SHA-256 key over exactly those: the bytes of both image arrays, the embedding's SHA-256,
the parameters, the source of the gate's modules, the versions of torch and numpy, and
whether the CPU computes the embedding in bf16
(:func:`synthray.models.runtime.cpu_bf16_fast`). Any change to any of them gives another key,
so a stale calibration is never read; a file that cannot be read is computed again and
replaced. The files are safetensors, written under a temporary name and renamed
(:func:`synthray.models.checkpoint.save_state`), so a crash leaves the whole file or none.

The files hold scores and embeddings derived from the site's images (no images, no patient
keys); they live under the data directory with everything else and can be deleted at any
time (the next check computes them again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from synthray.models.checkpoint import load_state, save_state, unfinished_writes
from synthray.models.gate.memorization import Calibration
from synthray.models.runtime import cpu_bf16_fast

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
_FORMAT = 3
KIND = "gate-calibration"
# What reading a damaged or foreign file raises.
UNREADABLE = (OSError, ValueError, KeyError, SafetensorError)


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
    h.update(f"bf16 {cpu_bf16_fast()}".encode())  # the embeddings' precision
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
    """Write ``calibration`` to ``path`` (safetensors, atomically: see
    :func:`synthray.models.checkpoint.save_state`). A check that filled in training-side
    entries writes it again the same way; of two such writes at once, the later one wins
    and the other's entries are computed again by a later check (they are deterministic)."""
    tensors = {f"holdout.{k}": torch.from_numpy(v) for k, v in calibration.holdout_scores.items()}
    if calibration.train_embeddings is not None:
        tensors["train_embeddings"] = torch.from_numpy(calibration.train_embeddings)
    if calibration.train_nearest_other is not None:
        tensors["train_nearest_other"] = torch.from_numpy(calibration.train_nearest_other)
    save_state(path, tensors, {"kind": KIND, "params": calibration.params})


def load(path: Path) -> Calibration:
    """Read a file written by :func:`save` (one of ``UNREADABLE`` if it is not one)."""
    tensors, meta = load_state(path)
    if meta.get("kind") != KIND:
        raise ValueError("not a gate calibration file")
    params = meta["params"]
    scores = {name: tensors[f"holdout.{name}"].numpy() for name in params["spaces"]}
    emb = tensors["train_embeddings"].numpy() if "train_embeddings" in tensors else None
    if any(v.shape != (params["holdout"],) for v in scores.values()):
        raise ValueError("calibration file's scores do not match its parameters")
    if emb is not None and emb.shape[0] != params["train"]:
        raise ValueError("calibration file's embeddings do not match its parameters")
    own = tensors["train_nearest_other"].numpy() if "train_nearest_other" in tensors else None
    if own is not None and own.shape != (params["train"],):
        raise ValueError("calibration file's training-side scores do not match its parameters")
    return Calibration(
        holdout_scores=scores, train_embeddings=emb, params=params, train_nearest_other=own
    )


def path_for(directory: Path, key: str) -> Path:
    """Where :func:`cached` keeps the calibration of ``key``."""
    return directory / f"{key}.safetensors"


def missing(calibration: Calibration) -> int:
    """How many training-side entries (``train_nearest_other``) the calibration still lacks."""
    own = calibration.train_nearest_other
    return -1 if own is None else int(np.isnan(own).sum())


def cached(
    directory: Path, key: str, compute: Callable[[], Calibration], keep: int | None = None
) -> tuple[Calibration, bool]:
    """The calibration stored under ``key`` in ``directory``, else ``compute()`` stored there.

    Returns it and whether it was reused. A file's modification time is its last use; with
    ``keep``, a newly stored calibration prunes the directory to the ``keep`` most recently
    used (:func:`prune`).
    """
    path = path_for(directory, key)
    if path.exists():
        try:
            calibration = load(path)
            with contextlib.suppress(OSError):  # another worker may have pruned it
                os.utime(path)
            return calibration, True
        except UNREADABLE as e:
            # The file's name is a hash; the exception's type says enough (no messages logged).
            log.warning(
                "gate calibration %s unreadable (%s); computing it again",
                key[:12],
                type(e).__name__,
            )
    calibration = compute()
    save(path, calibration)
    if keep is not None:
        prune(directory, keep)
    return calibration, False


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` most recently used calibration files in ``directory``,
    and temporary files of interrupted writes older than an hour; returns what was deleted.
    Safe while other workers read and write there: a reader whose file is gone computes
    it again."""
    files = []
    for p in directory.glob("*.safetensors"):
        with contextlib.suppress(OSError):
            files.append((p.stat().st_mtime, p))
    files.sort(reverse=True)
    doomed = [p for _, p in files[keep:]]
    cutoff = time.time() - 3600
    for p in unfinished_writes(directory, "*.safetensors"):
        with contextlib.suppress(OSError):
            if p.stat().st_mtime < cutoff:
                doomed.append(p)
    for p in doomed:
        p.unlink(missing_ok=True)
    if doomed:
        log.info("gate calibrations pruned: %d file(s) deleted", len(doomed))
    return doomed
