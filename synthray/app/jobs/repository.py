"""All SQL on the jobs table. Claims and heartbeats are single conditional UPDATEs so
that two workers holding the same job id can never both run it."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import RowMapping, and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from synthray.app.jobs.schemas import TERMINAL, JobRead, JobState
from synthray.app.jobs.tables import Job


def add(session: Session, job: Job) -> Job:
    session.add(job)
    session.flush()
    return job


def get(session: Session, job_id: str, *, fresh: bool = False) -> Job | None:
    """The row; ``fresh`` reloads it over the session's copy (after a conditional UPDATE,
    which does not touch the objects already loaded)."""
    return session.get(Job, job_id, populate_existing=fresh)


_JOBS = Job.__table__
_READ = select(*(_JOBS.c[name] for name in JobRead.columns())).where(
    _JOBS.c.id == bindparam("job_id")
)


def read(session: Session, job_id: str) -> RowMapping | None:
    """The columns a client sees of one job (``JobRead``), or None. Clients poll this, so
    it is a Core statement on the session's connection, like the key lookup: no ORM
    object is built (the ORM's ``Session.get`` was a sixth of a PostgreSQL status read's
    CPU in the API process)."""
    return session.connection().execute(_READ, {"job_id": job_id}).mappings().one_or_none()


def list_recent(session: Session, limit: int, kind: str | None, state: str | None) -> list[Job]:
    stmt = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if kind:
        stmt = stmt.where(Job.kind == kind)
    if state:
        stmt = stmt.where(Job.state == state)
    return list(session.scalars(stmt))


def claim(session: Session, job_id: str, owner: str, now: datetime, lease: timedelta) -> bool:
    """Take the job if it is queued, or running under an expired lease."""
    stmt = (
        update(Job)
        .where(
            Job.id == job_id,
            Job.cancel_requested.is_(False),
            or_(
                Job.state == JobState.queued,
                and_(Job.state == JobState.running, Job.lease_expires_at < now),
            ),
        )
        .values(
            state=JobState.running,
            lease_owner=owner,
            lease_expires_at=now + lease,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            started_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]


def heartbeat(
    session: Session,
    job_id: str,
    owner: str,
    now: datetime,
    lease: timedelta,
    progress: dict[str, Any] | None,
) -> bool:
    values: dict[str, Any] = {"lease_expires_at": now + lease, "heartbeat_at": now}
    if progress is not None:
        values.update(
            progress_step=progress["step"],
            progress_total=progress["total"],
            progress_message=progress["message"][:500],
            progress_detail=progress["detail"],
        )
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.running)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]


def finish(
    session: Session, job_id: str, owner: str, now: datetime, state: str, **values: Any
) -> bool:
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.running)
        .values(state=state, finished_at=now, lease_owner=None, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]


def expired_running(session: Session, now: datetime) -> list[Job]:
    stmt = select(Job).where(Job.state == JobState.running, Job.lease_expires_at < now)
    return list(session.scalars(stmt.with_for_update(skip_locked=True)))


def stale_queued(session: Session, before: datetime) -> list[Job]:
    """Queued jobs published before ``before``, or never published (``enqueued_at`` NULL)."""
    stmt = select(Job).where(
        Job.state == JobState.queued, or_(Job.enqueued_at < before, Job.enqueued_at.is_(None))
    )
    return list(session.scalars(stmt.with_for_update(skip_locked=True)))


def mark_unpublished(session: Session, job_id: str) -> None:
    """The broker did not take this job's message: the sweeper publishes it again."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.queued).values(enqueued_at=None)
    )


def end_times(session: Session, ids: list[str]) -> dict[str, datetime | None]:
    """For each of ``ids`` that has a job row: when it ended (None while queued or running)."""
    if not ids:
        return {}
    stmt = select(Job.id, Job.state, Job.finished_at).where(Job.id.in_(ids))
    return {
        job_id: finished if state in TERMINAL else None
        for job_id, state, finished in session.execute(stmt)
    }


def requeue_ended(session: Session, job_id: str, ended: list[str], now: datetime) -> bool:
    """Queue again a job in one of the ``ended`` states, its attempts counted from zero;
    False when it is no longer in one (a concurrent retry got there first)."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.state.in_(ended))
        .values(
            state=JobState.queued,
            attempts=0,
            error=None,
            cancel_requested=False,
            lease_owner=None,
            lease_expires_at=None,
            finished_at=None,
            enqueued_at=now,
            progress_message="queued again by an operator",
        )
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
