from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from synthray.app.db import Base, utcnow
from synthray.app.imagechecks.schemas import ImageCheckState


class ImageCheck(Base):
    """A memorization check of images made elsewhere, against one dataset version.

    Checked images are kept only as evidence for the report. Nothing here can be
    exported: exports take synthetic batches, and no path leads from a check to one.
    """

    __tablename__ = "image_checks"

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id"))
    resolution: Mapped[int]
    state: Mapped[ImageCheckState] = mapped_column(String(20), default=ImageCheckState.queued)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    report_blob: Mapped[str | None] = mapped_column(String(64), default=None)
    report_html_blob: Mapped[str | None] = mapped_column(String(64), default=None)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
