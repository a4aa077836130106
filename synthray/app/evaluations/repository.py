from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from synthray.app.evaluations.schemas import EvaluationState
from synthray.app.evaluations.tables import Evaluation


def add(session: Session, evaluation: Evaluation) -> Evaluation:
    session.add(evaluation)
    session.flush()
    return evaluation


def get(session: Session, evaluation_id: int) -> Evaluation | None:
    return session.get(Evaluation, evaluation_id)


def for_version(session: Session, model_version_id: int) -> Sequence[Evaluation]:
    return session.scalars(
        select(Evaluation)
        .where(Evaluation.model_version_id == model_version_id)
        .order_by(Evaluation.id.desc())
    ).all()


def latest_done(session: Session, model_version_id: int) -> Evaluation | None:
    return session.scalars(
        select(Evaluation)
        .where(
            Evaluation.model_version_id == model_version_id,
            Evaluation.state == EvaluationState.done,
        )
        .order_by(Evaluation.id.desc())
        .limit(1)
    ).first()
