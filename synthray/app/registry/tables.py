from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from synthray.app.db import Base, utcnow


class RegisteredModel(Base):
    __tablename__ = "registered_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Relationships here are read-only and never load by lazy SQL: a repository query
    # names what it loads (or the rows are already in the session).
    versions: Mapped[list[ModelVersion]] = relationship(
        viewonly=True, lazy="raise_on_sql", order_by="ModelVersion.version"
    )
    aliases: Mapped[list[ModelAlias]] = relationship(
        viewonly=True, lazy="raise_on_sql", order_by="ModelAlias.alias"
    )


class ModelVersion(Base):
    """A trained generator with its lineage. Rows are never rewritten."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id"), index=True)
    version: Mapped[int]
    dataset_version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id"))
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    architecture: Mapped[str] = mapped_column(String(40))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    classes: Mapped[list[Any]] = mapped_column(default=list)
    code_version: Mapped[str] = mapped_column(String(40))
    train_job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    blob_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    encoder_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    archived: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    registered_model: Mapped[RegisteredModel] = relationship(viewonly=True, lazy="raise_on_sql")


class ModelAlias(Base):
    """Where an alias (e.g. ``candidate``, ``approved``) points now."""

    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("model_id", "alias"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id"), index=True)
    alias: Mapped[str] = mapped_column(String(40))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    moved_by: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), default=None)
    moved_at: Mapped[datetime] = mapped_column(default=utcnow)

    target: Mapped[ModelVersion] = relationship(viewonly=True, lazy="raise_on_sql")


class ModelAliasMove(Base):
    """Append-only history of every alias move: who, when, from which version to which."""

    __tablename__ = "model_alias_moves"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id"), index=True)
    alias: Mapped[str] = mapped_column(String(40))
    from_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id"), default=None
    )
    to_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    moved_by: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), default=None)
    moved_by_name: Mapped[str | None] = mapped_column(String(100), default=None)
    moved_at: Mapped[datetime] = mapped_column(default=utcnow)

    moved_from: Mapped[ModelVersion | None] = relationship(
        foreign_keys=[from_version_id], viewonly=True, lazy="raise_on_sql"
    )
    moved_to: Mapped[ModelVersion | None] = relationship(
        foreign_keys=[to_version_id], viewonly=True, lazy="raise_on_sql"
    )


class QualityEncoder(Base):
    """A network trained on a dataset version's real training split, registered by sha256:
    ``quality`` (supervised on the labels) and ``quality-ssl`` (self-supervised) are the
    feature encoders of the quality metrics, ``copydetect`` the copy-detection embedding of
    the memorization gate. One of each per dataset version and resolution, so every
    generator of that version is measured in the same spaces."""

    __tablename__ = "quality_encoders"
    __table_args__ = (UniqueConstraint("dataset_version_id", "resolution", "kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), default="quality")  # see the docstring
    dataset_version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id"))
    resolution: Mapped[int]
    blob_sha256: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    holdout_accuracy: Mapped[float | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
