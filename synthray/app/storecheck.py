"""Is this process's blob store the one the database's rows point into?

Rows name blobs by sha256 and every process opens them under its own
``SYNTHRAY_DATA_DIR/blobs``. With workers on several machines that folder must be one
shared filesystem (NFS, CephFS, a SAN volume); a worker with a local folder instead would
write weights and bundles that the API can never find, and fail on every blob the API
wrote. Nothing would say why.

So the store carries an identity: the first process to start writes a random token both
into the database (``store_identity``) and into a marker file in the blob folder. Every
later process (API at start-up, worker when it becomes ready, and ``/readyz``) reads the
database's token and compares it with the marker it sees. A missing or different marker
means a different folder: the process refuses to start and says which setting to fix.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from synthray.app.db import Base, session_scope
from synthray.app.storage import BlobStore, atomic_write_bytes

MARKER = ".synthray-store-id"


class StoreIdentity(Base):
    """One row: the token the blob store's marker file must hold."""

    __tablename__ = "store_identity"

    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str] = mapped_column(String(64))


class StoreMismatch(RuntimeError):
    """This process's blob folder is not the store the database uses."""


def _marker(blob_dir: Path) -> Path:
    return blob_dir / MARKER


def _claim_marker(marker: Path, token: str) -> str:
    """Write ``token`` as the marker unless one is there already (no overwrite, even when
    two processes race on one shared folder); returns the marker's token."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".tmp-{secrets.token_hex(8)}")
    atomic_write_bytes(tmp, token.encode())
    try:
        os.link(tmp, marker)  # fails if the marker exists
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return marker.read_text().strip()


def _refuse_if_blobs_missing(database_url: str, blob_dir: Path) -> None:
    """An existing deployment meeting the check for the first time: before this folder is
    declared the store, the newest blobs the rows name must be in it."""
    from synthray.app.datasets.tables import DatasetVersion
    from synthray.app.registry.tables import ModelVersion

    store = BlobStore(blob_dir)
    with session_scope(database_url, read_only=True) as s:
        named = [
            *s.scalars(
                select(DatasetVersion.images_blob)
                .where(DatasetVersion.images_blob.is_not(None))
                .order_by(DatasetVersion.id.desc())
                .limit(3)
            ),
            *s.scalars(select(ModelVersion.blob_sha256).order_by(ModelVersion.id.desc()).limit(3)),
        ]
    missing = [sha for sha in named if sha and not store.exists(sha)]
    if missing:
        raise StoreMismatch(
            f"the blob folder {blob_dir} lacks {len(missing)} of the {len(named)} newest "
            "blobs the database names: it is not this deployment's blob store. Every API and "
            "worker process must see the same shared filesystem at SYNTHRAY_DATA_DIR/blobs "
            "(see docs/deployment.md)."
        )


def ensure(database_url: str, blob_dir: Path) -> str:
    """Check (or, on the first start, establish) that ``blob_dir`` is the database's store;
    returns the token, raises :class:`StoreMismatch` with the fix otherwise."""
    marker = _marker(blob_dir)
    with session_scope(database_url) as s:
        row = s.get(StoreIdentity, 1)
        token = row.token if row else None
    if token is None:
        _refuse_if_blobs_missing(database_url, blob_dir)
        token = _claim_marker(marker, secrets.token_hex(16))
        try:
            with session_scope(database_url) as s:
                s.add(StoreIdentity(id=1, token=token))
        except IntegrityError:  # another process established it first
            with session_scope(database_url) as s:
                token = s.scalars(select(StoreIdentity.token)).one()
    seen = marker.read_text().strip() if marker.is_file() else None
    if seen != token:
        what = "has no store marker" if seen is None else "holds another store's marker"
        raise StoreMismatch(
            f"the blob folder {blob_dir} {what}: it is not the blob store this database "
            "uses. Every API and worker process must see the same shared filesystem at "
            "SYNTHRAY_DATA_DIR/blobs (see docs/deployment.md)."
        )
    return token


def status(database_url: str, blob_dir: Path) -> str:
    """For /readyz: "ok", or why not."""
    try:
        ensure(database_url, blob_dir)
    except StoreMismatch:
        return "unavailable (not the database's blob store)"
    return "ok"


def named_blobs(database_url: str) -> list[tuple[str, str]]:
    """Every blob the database names, as (where, sha256): the blob columns, and the
    gallery and evidence-page blobs that model metrics and gate verdicts record."""
    from synthray.app.batches.tables import SyntheticBatch
    from synthray.app.datasets.tables import DatasetVersion
    from synthray.app.evaluations.tables import Evaluation
    from synthray.app.exports.tables import Export
    from synthray.app.imagechecks.tables import ImageCheck
    from synthray.app.registry.tables import ModelVersion, QualityEncoder

    columns: list[tuple[Any, tuple[str, ...]]] = [
        (DatasetVersion, ("images_blob",)),
        (ModelVersion, ("blob_sha256",)),
        (QualityEncoder, ("blob_sha256",)),
        (SyntheticBatch, ("images_blob", "report_blob")),
        (Evaluation, ("result_blob", "csv_blob", "chart_blob")),
        (Export, ("bundle_sha256",)),
        (ImageCheck, ("report_blob", "report_html_blob")),
    ]
    out: list[tuple[str, str]] = []
    with session_scope(database_url, read_only=True) as s:
        for table, names in columns:
            for row in s.scalars(select(table)):
                for name in names:
                    sha = getattr(row, name)
                    if sha:
                        out.append((f"{table.__tablename__}.{name} (id {row.id})", sha))
        for mv in s.scalars(select(ModelVersion)):
            sha = ((mv.metrics or {}).get("quality") or {}).get("gallery_sha256")
            if sha:
                out.append((f"model_versions.metrics gallery (id {mv.id})", sha))
        for b in s.scalars(select(SyntheticBatch)):
            sha = (b.check or {}).get("report_html_sha256")
            if sha:
                out.append((f"synthetic_batches.check evidence page (id {b.id})", sha))
    return out


def verify(database_url: str, blob_dir: Path) -> tuple[int, list[str]]:
    """Re-read every blob the database names and check its sha256: (blobs checked, the
    problems found, one sentence each)."""
    from synthray.app.storage import BlobCorrupt, BlobNotFound

    store = BlobStore(blob_dir)
    problems: list[str] = []
    named = named_blobs(database_url)
    seen: set[str] = set()
    for where, sha in named:
        if sha in seen:
            continue
        seen.add(sha)
        try:
            store.open_verified(sha)
        except BlobNotFound:
            problems.append(f"{where}: blob {sha[:12]} is missing")
        except BlobCorrupt:
            problems.append(f"{where}: blob {sha[:12]} does not match its sha256")
    return len(seen), problems
