from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from synthray.app.datasets.schemas import DatasetVersionState
from synthray.app.db import Base, utcnow


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Read-only, loaded only where a repository asks for them (never by lazy SQL).
    versions: Mapped[list[DatasetVersion]] = relationship(
        viewonly=True, lazy="raise_on_sql", order_by="DatasetVersion.version"
    )


class DatasetVersion(Base):
    """An immutable, content-hashed set of de-identified images and their labels."""

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    version: Mapped[int]
    state: Mapped[DatasetVersionState] = mapped_column(
        String(20), default=DatasetVersionState.ingesting
    )
    content_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    images_blob: Mapped[str | None] = mapped_column(String(64), default=None)
    resolutions: Mapped[list[Any]] = mapped_column(default=list)
    classes: Mapped[list[Any]] = mapped_column(default=list)
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    holdout_fraction: Mapped[float] = mapped_column(default=0.2)
    split_seed: Mapped[int] = mapped_column(default=0)
    provenance: Mapped[dict[str, Any]] = mapped_column(default=dict)
    ingest_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    dataset: Mapped[Dataset] = relationship(viewonly=True, lazy="raise_on_sql")


class DatasetImage(Base):
    """Minimal, pseudonymous metadata for one image of a dataset version."""

    __tablename__ = "dataset_images"
    __table_args__ = (UniqueConstraint("version_id", "idx"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id"), index=True)
    idx: Mapped[int]
    patient_key: Mapped[str] = mapped_column(String(32), index=True)
    label: Mapped[int]
    split: Mapped[str] = mapped_column(String(10))
    view: Mapped[str | None] = mapped_column(String(10), default=None)
    sex: Mapped[str | None] = mapped_column(String(1), default=None)
    age_band: Mapped[str | None] = mapped_column(String(10), default=None)
    pixel_sha256: Mapped[str] = mapped_column(String(64))
