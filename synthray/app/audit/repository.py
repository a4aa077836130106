from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from synthray.app.audit.chain import GENESIS
from synthray.app.audit.schemas import AuditFilter
from synthray.app.audit.tables import AuditEvent, AuditHead


def advance_head(session: Session) -> tuple[int, str]:
    """Take the next ``seq`` and the previous record's hash, locking the head row until the
    transaction ends (the UPDATE comes first, so SQLite takes its write lock here too)."""
    stmt = (
        update(AuditHead)
        .where(AuditHead.id == 1)
        .values(seq=AuditHead.seq + 1)
        .returning(AuditHead.seq, AuditHead.hash)
    )
    row = session.execute(stmt).one_or_none()
    if row is None:  # a database emptied by hand, or not migrated with its head row
        dialect = session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        session.execute(
            insert(AuditHead).values(id=1, seq=0, hash=GENESIS).on_conflict_do_nothing()
        )
        row = session.execute(stmt).one()
    return int(row[0]), str(row[1])


def set_head_hash(session: Session, seq: int, digest: str) -> None:
    session.execute(
        update(AuditHead).where(AuditHead.id == 1, AuditHead.seq == seq).values(hash=digest)
    )


def head(session: Session) -> tuple[int, str] | None:
    row = session.get(AuditHead, 1)
    return (row.seq, row.hash) if row else None


def in_order(session: Session) -> Iterator[AuditEvent]:
    stmt = select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=1000)
    yield from session.scalars(stmt)


def add(session: Session, event: AuditEvent) -> None:
    session.add(event)
    session.flush()


def list_recent(session: Session, limit: int, where: AuditFilter) -> list[AuditEvent]:
    stmt = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
    for column, value in (
        (AuditEvent.object_type, where.object_type),
        (AuditEvent.action, where.action),
        (AuditEvent.actor_name, where.actor),
        (AuditEvent.outcome, where.outcome),
        (AuditEvent.object_id, where.object_id),
    ):
        if value:
            stmt = stmt.where(column == value)
    return list(session.scalars(stmt))


def download_starts(
    session: Session, export_id: int, actor_name: str
) -> list[tuple[datetime, int]]:
    """(time, first byte) of each download of an export by one actor, oldest first."""
    stmt = (
        select(AuditEvent.at, AuditEvent.detail)
        .where(
            AuditEvent.action == "download_export",
            AuditEvent.object_type == "export",
            AuditEvent.object_id == str(export_id),
            AuditEvent.outcome == "ok",
            AuditEvent.actor_name == actor_name,
        )
        .order_by(AuditEvent.seq)
    )
    return [(at, int((d or {}).get("range_start", 0))) for at, d in session.execute(stmt)]
