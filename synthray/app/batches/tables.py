from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from synthray.app.batches.schemas import BatchState
from synthray.app.db import Base, utcnow


class SyntheticBatch(Base):
    """Images sampled from one model version, and the memorization gate's verdict.

    state: generating -> unchecked -> checking -> passed | failed. Only ``passed``
    batches whose images still hash to ``checked_sha256`` can be exported.
    """

    __tablename__ = "synthetic_batches"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    state: Mapped[BatchState] = mapped_column(String(20), default=BatchState.generating)
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    seed: Mapped[int] = mapped_column(default=0)
    # How the images were chosen from those drawn (oversample, per class drawn / kept).
    selection: Mapped[dict[str, Any]] = mapped_column(default=dict)
    images_blob: Mapped[str | None] = mapped_column(String(64), default=None)
    checked_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    check: Mapped[dict[str, Any]] = mapped_column(default=dict)
    report_blob: Mapped[str | None] = mapped_column(String(64), default=None)
    synth_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    check_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
