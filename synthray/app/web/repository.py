from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from synthray.app.web.tables import WebSession


def add(session: Session, row: WebSession) -> WebSession:
    session.add(row)
    session.flush()
    return row


def by_hash(session: Session, token_hash: str) -> WebSession | None:
    stmt = select(WebSession).where(WebSession.token_hash == token_hash)
    return session.scalars(stmt).one_or_none()
