from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from synthray import code_version
from synthray.app.datasets import service as datasets
from synthray.app.errors import Invalid, NotFound
from synthray.app.jobs import service as jobs
from synthray.app.jobs.schemas import JobKind
from synthray.app.registry import repository
from synthray.app.registry.schemas import (
    ModelRead,
    ModelVersionRead,
    TrainAccepted,
    TrainRequest,
)
from synthray.app.registry.tables import ModelVersion, RegisteredModel
from synthray.config import Settings


def request_training(
    session: Session, settings: Settings, req: TrainRequest, created_by: int
) -> TrainAccepted:
    dv = datasets.resolve_version(session, req.dataset, req.dataset_version)
    if req.resolution not in dv.resolutions:
        raise Invalid(
            f"the dataset version holds {sorted(dv.resolutions)}px images, not {req.resolution}px",
            field="resolution",
        )
    params = req.model_dump() | {"dataset_version_id": dv.id, "classes": list(dv.classes)}
    job = jobs.create(session, settings, JobKind.train, params, created_by)
    return TrainAccepted(job_id=job.id, model_name=req.model_name, dataset_version_id=dv.id)


def register_version(
    session: Session,
    *,
    model_name: str,
    dataset_version_id: int,
    dataset_sha256: str,
    architecture: str,
    config: dict[str, Any],
    classes: list[str],
    train_job_id: str,
    metrics: dict[str, Any],
    blob_sha256: str,
    size_bytes: int,
) -> ModelVersion:
    """Add a new immutable version (idempotent per training job)."""
    existing = repository.by_train_job(session, train_job_id)
    if existing is not None:
        return existing
    model = repository.get_model(session, model_name) or repository.add_model(session, model_name)
    return repository.add_version(
        session,
        ModelVersion(
            model_id=model.id,
            version=repository.next_version(session, model.id),
            dataset_version_id=dataset_version_id,
            dataset_sha256=dataset_sha256,
            architecture=architecture,
            config=config,
            classes=classes,
            code_version=code_version(),
            train_job_id=train_job_id,
            metrics=metrics,
            blob_sha256=blob_sha256,
            size_bytes=size_bytes,
        ),
    )


def version_read(model: RegisteredModel, mv: ModelVersion) -> ModelVersionRead:
    return ModelVersionRead(
        id=mv.id,
        model=model.name,
        version=mv.version,
        dataset_version_id=mv.dataset_version_id,
        dataset_sha256=mv.dataset_sha256,
        architecture=mv.architecture,
        config=mv.config,
        classes=list(mv.classes),
        code_version=mv.code_version,
        train_job_id=mv.train_job_id,
        metrics=mv.metrics,
        blob_sha256=mv.blob_sha256,
        size_bytes=mv.size_bytes,
        archived=mv.archived,
        created_at=mv.created_at,
    )


def model_read(session: Session, model: RegisteredModel) -> ModelRead:
    versions = [version_read(model, v) for v in repository.versions_of(session, model.id)]
    return ModelRead(id=model.id, name=model.name, created_at=model.created_at, versions=versions)


def list_models(session: Session) -> list[ModelRead]:
    return [model_read(session, m) for m in repository.list_models(session)]


def get_model(session: Session, name: str) -> ModelRead:
    m = repository.get_model(session, name)
    if m is None:
        raise NotFound(f"model {name!r} not found")
    return model_read(session, m)


def get_version(session: Session, name: str, version: int) -> ModelVersionRead:
    m = repository.get_model(session, name)
    mv = repository.find_version(session, m.id, version) if m else None
    if m is None or mv is None:
        raise NotFound(f"model {name!r} version {version} not found")
    return version_read(m, mv)


def resolve_version(session: Session, name: str, version: int | None) -> ModelVersion:
    m = repository.get_model(session, name)
    if m is None:
        raise Invalid(f"model {name!r} not found", field="model")
    mv = repository.find_version(session, m.id, version)
    if mv is None:
        raise Invalid(f"model {name!r} has no such version", field="version")
    return mv


def get_version_by_id(session: Session, version_id: int) -> ModelVersion:
    mv = repository.get_version(session, version_id)
    if mv is None:
        raise NotFound(f"model version {version_id} not found")
    return mv
