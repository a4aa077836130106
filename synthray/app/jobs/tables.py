from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from synthray.app.db import Base, utcnow
from synthray.app.jobs.schemas import JobKind, JobState, Progress


class Job(Base):
    """The source of truth for every piece of background work.

    The broker only carries the id. A worker claims the row (state ``running`` plus a
    lease it renews with heartbeats); a second delivery of the same id finds the row
    claimed or finished and does nothing.
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[JobKind] = mapped_column(String(20), index=True)
    queue: Mapped[str] = mapped_column(String(20))
    state: Mapped[JobState] = mapped_column(String(20), index=True, default=JobState.queued)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress_step: Mapped[int] = mapped_column(default=0)
    progress_total: Mapped[int | None] = mapped_column(default=None)
    progress_message: Mapped[str] = mapped_column(String(500), default="")
    progress_detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(100), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), default=None)
    # The id of the API request that created the job; the worker logs under it too.
    request_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    @property
    def progress(self) -> dict[str, Any]:
        """The progress columns as one value (what ``JobRead.progress`` shows)."""
        return {name: getattr(self, f"progress_{name}") for name in Progress.model_fields}
