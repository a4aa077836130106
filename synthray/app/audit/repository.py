from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from synthray.app.audit.tables import AuditEvent


def add(session: Session, event: AuditEvent) -> None:
    session.add(event)
    session.flush()


def list_recent(session: Session, limit: int, object_type: str | None) -> list[AuditEvent]:
    stmt = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if object_type:
        stmt = stmt.where(AuditEvent.object_type == object_type)
    return list(session.scalars(stmt))
