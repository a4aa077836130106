from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from synthray.app.exports.schemas import ExportState
from synthray.app.exports.tables import Export, ExportReview


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


def get_for_update(session: Session, export_id: int) -> Export | None:
    stmt = select(Export).where(Export.id == export_id).with_for_update()
    return session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()


def reviews(session: Session, export_id: int) -> list[ExportReview]:
    stmt = select(ExportReview).where(ExportReview.export_id == export_id)
    return list(session.scalars(stmt.order_by(ExportReview.id)))


def add_review(
    session: Session, export_id: int, key_id: int, name: str, decision: str, comment: str
) -> ExportReview:
    review = ExportReview(
        export_id=export_id,
        reviewer_key_id=key_id,
        reviewer_name=name,
        decision=decision,
        comment=comment,
    )
    session.add(review)
    session.flush()
    return review
