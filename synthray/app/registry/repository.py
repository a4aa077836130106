from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload, selectinload
from sqlalchemy.sql.base import ExecutableOption

from synthray.app.db import lock_or_create
from synthray.app.registry.tables import (
    ModelAlias,
    ModelAliasMove,
    ModelVersion,
    QualityEncoder,
    RegisteredModel,
)


def _tree() -> list[ExecutableOption]:
    """Options that load (or reload) a model's versions and aliases with it."""
    return [
        selectinload(RegisteredModel.versions),
        selectinload(RegisteredModel.aliases).joinedload(ModelAlias.target),
    ]


def get_model(session: Session, name: str, *, with_tree: bool = False) -> RegisteredModel | None:
    """The model; ``with_tree`` also loads its versions and aliases."""
    stmt = select(RegisteredModel).where(RegisteredModel.name == name)
    if with_tree:
        stmt = stmt.options(*_tree()).execution_options(populate_existing=True)
    return session.scalars(stmt).one_or_none()


def lock_or_add(session: Session, name: str) -> RegisteredModel:
    """The model, created if new, locked while this transaction numbers a version."""
    return lock_or_create(session, RegisteredModel, name=name)


def list_models(session: Session) -> list[RegisteredModel]:
    """Every model, by name, with its versions and aliases."""
    stmt = select(RegisteredModel).order_by(RegisteredModel.name).options(*_tree())
    return list(session.scalars(stmt.execution_options(populate_existing=True)))


def next_version(session: Session, model_id: int) -> int:
    stmt = select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model_id)
    return (session.scalar(stmt) or 0) + 1


def add_version(session: Session, mv: ModelVersion) -> ModelVersion:
    session.add(mv)
    session.flush()
    return mv


def find_version(
    session: Session,
    *,
    version_id: int | None = None,
    train_job_id: str | None = None,
    model_id: int | None = None,
    number: int | None = None,
    alias: str | None = None,
    usable: bool = False,
) -> ModelVersion | None:
    """The one query for a model version, with its model loaded.

    By ``version_id``; by the training job that produced it; or within ``model_id`` by
    ``number``, by ``alias``, or (neither) the latest. ``usable`` leaves archived
    versions out.
    """
    if version_id is None and train_job_id is None and model_id is None:
        raise ValueError("find_version needs a version id, a training job id or a model id")
    stmt = select(ModelVersion).options(joinedload(ModelVersion.registered_model))
    if version_id is not None:
        stmt = stmt.where(ModelVersion.id == version_id)
    if train_job_id is not None:
        stmt = stmt.where(ModelVersion.train_job_id == train_job_id)
    if model_id is not None:
        stmt = stmt.where(ModelVersion.model_id == model_id)
    if number is not None:
        stmt = stmt.where(ModelVersion.version == number)
    if alias is not None:
        stmt = stmt.join(ModelAlias, ModelAlias.version_id == ModelVersion.id).where(
            ModelAlias.model_id == ModelVersion.model_id, ModelAlias.alias == alias
        )
    if usable:
        stmt = stmt.where(ModelVersion.archived.is_(False))
    stmt = stmt.order_by(ModelVersion.version.desc()).limit(1)
    return session.scalars(stmt).one_or_none()


def by_train_job(session: Session, job_id: str) -> ModelVersion | None:
    return find_version(session, train_job_id=job_id)


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
    """The alias history of a model, oldest first, with the versions each move names."""
    stmt = (
        select(ModelAliasMove)
        .where(ModelAliasMove.model_id == model_id)
        .options(selectinload(ModelAliasMove.moved_from), selectinload(ModelAliasMove.moved_to))
    )
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


def encoders_of_kind(session: Session, dataset_version_id: int, kind: str) -> list[QualityEncoder]:
    """Every encoder of ``kind`` of a dataset version, oldest first (one per resolution)."""
    stmt = (
        select(QualityEncoder)
        .where(
            QualityEncoder.dataset_version_id == dataset_version_id,
            QualityEncoder.kind == kind,
        )
        .order_by(QualityEncoder.id)
    )
    return list(session.scalars(stmt))


def add_encoder(session: Session, enc: QualityEncoder) -> QualityEncoder:
    session.add(enc)
    session.flush()
    return enc
