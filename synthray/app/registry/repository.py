from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from synthray.app.registry.tables import (
    ModelAlias,
    ModelAliasMove,
    ModelVersion,
    QualityEncoder,
    RegisteredModel,
)


def get_model(session: Session, name: str) -> RegisteredModel | None:
    return session.scalars(
        select(RegisteredModel).where(RegisteredModel.name == name)
    ).one_or_none()


def get_model_by_id(session: Session, model_id: int) -> RegisteredModel | None:
    return session.get(RegisteredModel, model_id)


def add_model(session: Session, name: str) -> RegisteredModel:
    m = RegisteredModel(name=name)
    session.add(m)
    session.flush()
    return m


def list_models(session: Session) -> list[RegisteredModel]:
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)))


def versions_of(session: Session, model_id: int) -> list[ModelVersion]:
    stmt = select(ModelVersion).where(ModelVersion.model_id == model_id)
    return list(session.scalars(stmt.order_by(ModelVersion.version)))


def next_version(session: Session, model_id: int) -> int:
    stmt = select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model_id)
    return (session.scalar(stmt) or 0) + 1


def add_version(session: Session, mv: ModelVersion) -> ModelVersion:
    session.add(mv)
    session.flush()
    return mv


def get_version(session: Session, version_id: int) -> ModelVersion | None:
    return session.get(ModelVersion, version_id)


def find_version(session: Session, model_id: int, version: int | None) -> ModelVersion | None:
    stmt = select(ModelVersion).where(
        ModelVersion.model_id == model_id, ModelVersion.archived.is_(False)
    )
    if version is None:
        stmt = stmt.order_by(ModelVersion.version.desc())
    else:
        stmt = stmt.where(ModelVersion.version == version)
    return session.scalars(stmt.limit(1)).one_or_none()


def by_train_job(session: Session, job_id: str) -> ModelVersion | None:
    stmt = select(ModelVersion).where(ModelVersion.train_job_id == job_id)
    return session.scalars(stmt).one_or_none()


def aliases_of(session: Session, model_id: int) -> list[ModelAlias]:
    stmt = select(ModelAlias).where(ModelAlias.model_id == model_id).order_by(ModelAlias.alias)
    return list(session.scalars(stmt))


def get_alias(session: Session, model_id: int, alias: str) -> ModelAlias | None:
    stmt = select(ModelAlias).where(ModelAlias.model_id == model_id, ModelAlias.alias == alias)
    return session.scalars(stmt.with_for_update()).one_or_none()


def add_alias(session: Session, alias: ModelAlias) -> None:
    session.add(alias)
    session.flush()


def delete_alias(session: Session, alias: ModelAlias) -> None:
    session.delete(alias)
    session.flush()


def add_move(session: Session, move: ModelAliasMove) -> None:
    session.add(move)
    session.flush()


def moves_of(session: Session, model_id: int) -> list[ModelAliasMove]:
    stmt = select(ModelAliasMove).where(ModelAliasMove.model_id == model_id)
    return list(session.scalars(stmt.order_by(ModelAliasMove.id)))


def get_encoder(
    session: Session, dataset_version_id: int, resolution: int, kind: str = "quality"
) -> QualityEncoder | None:
    stmt = select(QualityEncoder).where(
        QualityEncoder.dataset_version_id == dataset_version_id,
        QualityEncoder.resolution == resolution,
        QualityEncoder.kind == kind,
    )
    return session.scalars(stmt).one_or_none()


def add_encoder(session: Session, enc: QualityEncoder) -> QualityEncoder:
    session.add(enc)
    session.flush()
    return enc
