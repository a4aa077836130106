from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from synthray.app.db import Base, utcnow
from synthray.app.exports.schemas import ExportState


class Export(Base):
    """A bundle of approved synthetic images addressed to one partner.

    state: building -> awaiting_approval -> approved once enough reviewers other than the
    requester approved it, or rejected by one reviewer (or failed or cancelled while
    building).
    """

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("synthetic_batches.id"), index=True)
    partner: Mapped[str] = mapped_column(String(100), index=True)
    state: Mapped[ExportState] = mapped_column(String(20), default=ExportState.building)
    bundle_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    image_count: Mapped[int | None] = mapped_column(default=None)
    build_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    requested_by: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), default=None)
    approved_by: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), default=None)
    approved_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    reviews: Mapped[list[ExportReview]] = relationship(
        order_by="ExportReview.id", lazy="selectin", viewonly=True
    )


class ExportReview(Base):
    """One reviewer's decision on one export, with the comment that gives the reason."""

    __tablename__ = "export_reviews"
    __table_args__ = (UniqueConstraint("export_id", "reviewer_key_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    export_id: Mapped[int] = mapped_column(ForeignKey("exports.id"), index=True)
    reviewer_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    reviewer_name: Mapped[str] = mapped_column(String(100))
    decision: Mapped[str] = mapped_column(String(10))  # approve | reject
    comment: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(default=utcnow)
