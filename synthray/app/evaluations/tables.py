from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from synthray.app.db import Base, utcnow
from synthray.app.evaluations.schemas import EvaluationState


class Evaluation(Base):
    """A utility evaluation of one generator version, with its lineage: the generator, the
    data it was trained on, the test set, the classifier's configuration and the code."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    dataset_version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id"))
    test_dataset_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset_versions.id"), default=None
    )
    state: Mapped[EvaluationState] = mapped_column(String(20), default=EvaluationState.queued)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result_blob: Mapped[str | None] = mapped_column(String(64), default=None)
    csv_blob: Mapped[str | None] = mapped_column(String(64), default=None)
    chart_blob: Mapped[str | None] = mapped_column(String(64), default=None)
    code_version: Mapped[str] = mapped_column(String(40))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
