from __future__ import annotations

from sqlalchemy.orm import Session

from synthray.app.imagechecks.tables import ImageCheck


def add(session: Session, check: ImageCheck) -> ImageCheck:
    session.add(check)
    session.flush()
    return check


def get(session: Session, check_id: int) -> ImageCheck | None:
    return session.get(ImageCheck, check_id)
