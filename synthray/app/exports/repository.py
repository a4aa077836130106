from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from synthray.app.exports.schemas import ExportState
from synthray.app.exports.tables import Export


def add(session: Session, export: Export) -> Export:
    session.add(export)
    session.flush()
    return export


def get(session: Session, export_id: int) -> Export | None:
    return session.get(Export, export_id)


def list_for(
    session: Session, partner: str | None, limit: int, state: ExportState | None = None
) -> list[Export]:
    stmt = select(Export).order_by(Export.id.desc()).limit(limit)
    if partner is not None:
        stmt = stmt.where(Export.partner == partner)
    if state is not None:
        stmt = stmt.where(Export.state == state)
    return list(session.scalars(stmt))
