from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from synthray.app.db import Base, utcnow
from synthray.app.exports.schemas import ExportState


class Export(Base):
    """A bundle of approved synthetic images addressed to one partner.

    state: building -> awaiting_approval -> approved (or failed or cancelled while
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
