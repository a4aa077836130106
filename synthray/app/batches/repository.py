from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from synthray.app.batches.tables import SyntheticBatch


def add(session: Session, batch: SyntheticBatch) -> SyntheticBatch:
    session.add(batch)
    session.flush()
    return batch


def get(session: Session, batch_id: int) -> SyntheticBatch | None:
    return session.get(SyntheticBatch, batch_id)


def get_for_update(session: Session, batch_id: int) -> SyntheticBatch | None:
    stmt = select(SyntheticBatch).where(SyntheticBatch.id == batch_id).with_for_update()
    return session.scalars(stmt).one_or_none()


def list_recent(session: Session, limit: int) -> list[SyntheticBatch]:
    stmt = select(SyntheticBatch).order_by(SyntheticBatch.id.desc()).limit(limit)
    return list(session.scalars(stmt))
