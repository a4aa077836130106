"""Jobs: the rows that are the truth about background work.

The API writes a row and publishes its id after the commit; a worker changes a row
only through the functions here (claim, heartbeat, finish), each one conditional
UPDATE that only flushes.
"""

from __future__ import annotations

import shutil
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from synthray import logs
from synthray.app.db import on_commit, session_scope, utcnow
from synthray.app.errors import NotFound
from synthray.app.jobs import broker, repository
from synthray.app.jobs.schemas import QUEUE_OF, JobKind, JobRead, JobState
from synthray.app.jobs.tables import Job
from synthray.config import Settings


def create(
    session: Session,
    settings: Settings,
    kind: JobKind,
    params: dict[str, Any],
    created_by: int | None,
) -> Job:
    """Write the job row; its id is published to the broker only after the commit."""
    job = repository.add(
        session,
        Job(
            id=str(uuid.uuid4()),
            kind=kind,
            queue=QUEUE_OF[kind],
            state=JobState.queued,
            params=params,
            max_attempts=settings.job_max_attempts,
            created_by=created_by,
            request_id=logs.request_id.get(),
            enqueued_at=utcnow(),
            progress_message="queued",
        ),
    )
    publish_after_commit(session, settings, job.id, job.queue)
    return job


def publish_after_commit(session: Session, settings: Settings, job_id: str, queue: str) -> None:
    """Publish the id once the row is committed. If the broker cannot take it, the row's
    ``enqueued_at`` is cleared: the sweeper re-publishes such a job at its next pass
    instead of after ``requeue_after_seconds``."""

    def publish() -> None:
        try:
            broker.publish(settings, job_id, queue)
        except Exception:
            with session_scope(settings.sqlalchemy_url) as s:
                repository.mark_unpublished(s, job_id)
            raise

    on_commit(session, publish)


def get(session: Session, job_id: str) -> Job:
    job = repository.get(session, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def read(session: Session, job_id: str) -> JobRead:
    """What a client sees of the job (its status, progress and result)."""
    row = repository.read(session, job_id)
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return JobRead.from_row(row)


def creator(session: Session, job_id: str) -> int | None:
    """The id of the API key that created the job (its follow-up jobs get the same)."""
    return get(session, job_id).created_by


def claim(session: Session, job_id: str, owner: str, now: datetime, lease: timedelta) -> Job | None:
    """The job, now running under ``owner``'s lease, if this delivery may run it; None when
    it is finished, cancelled, or held by another worker (so a redelivery does nothing)."""
    if not repository.claim(session, job_id, owner, now, lease):
        return None
    return repository.get(session, job_id, fresh=True)


def heartbeat(
    session: Session,
    job_id: str,
    owner: str,
    now: datetime,
    lease: timedelta,
    pending: dict[str, Any] | None,
) -> tuple[bool, bool]:
    """Renew ``owner``'s lease and store the pending progress report (if any).

    Returns (ok, cancel_requested); ok is False when ``owner`` no longer holds the job.
    """
    if not repository.heartbeat(session, job_id, owner, now, lease, pending):
        return False, False
    job = repository.get(session, job_id, fresh=True)
    return True, job is not None and job.cancel_requested


def finish(
    session: Session, job_id: str, owner: str, now: datetime, state: JobState, **values: Any
) -> bool:
    """Record the end of a job ``owner`` still holds; False (and nothing written) otherwise."""
    return repository.finish(session, job_id, owner, now, JobState(state), **values)


def list_jobs(
    session: Session, limit: int = 50, kind: str | None = None, state: str | None = None
) -> list[JobRead]:
    return [JobRead.model_validate(j) for j in repository.list_recent(session, limit, kind, state)]


def prune_job_files(session: Session, settings: Settings) -> list[str]:
    """Delete the scratch folders (``work/jobs/<id>``) of jobs that ended more than
    ``job_files_retention_days`` ago, and folders with no job row that old; return their ids.

    A succeeded job's folder goes as soon as it succeeds. A cancelled or failed job keeps its
    last checkpoint for inspection, but only for that long. Folders of queued or running
    jobs are never touched: a redelivered job resumes from them.
    """
    days = settings.job_files_retention_days
    root = settings.work_dir / "jobs"
    if days <= 0 or not root.is_dir():
        return []
    folders = {p.name: p for p in root.iterdir() if p.is_dir()}
    names = sorted(folders)
    cutoff = utcnow() - timedelta(days=days)
    ended = repository.end_times(session, names)
    removed = []
    for name in names:
        path = folders[name]
        if name in ended:
            finished = ended[name]
            expired = finished is not None and finished < cutoff
        else:  # no job row: judge by the folder's age
            expired = path.stat().st_mtime < cutoff.timestamp()
        if expired:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed
