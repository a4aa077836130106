from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from synthray import code_version
from synthray.app.audit import service as audit
from synthray.app.auth.schemas import Principal
from synthray.app.datasets import service as datasets
from synthray.app.db import utcnow
from synthray.app.errors import Conflict, Invalid, NotFound
from synthray.app.jobs import service as jobs
from synthray.app.jobs.schemas import JobKind
from synthray.app.registry import repository
from synthray.app.registry.schemas import (
    AliasMove,
    ModelRead,
    ModelVersionRead,
    TrainAccepted,
    TrainRequest,
    VersionComparison,
)
from synthray.app.registry.tables import (
    ModelAlias,
    ModelAliasMove,
    ModelVersion,
    QualityEncoder,
    RegisteredModel,
)
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
    classes = list(dv.classes)
    if req.classes is not None:
        unknown = sorted(set(req.classes) - set(classes))
        if unknown or len(set(req.classes)) < 2:
            raise Invalid(
                f"classes must be at least two of {classes}"
                + (f"; unknown: {unknown}" if unknown else ""),
                field="classes",
            )
        classes = [c for c in classes if c in set(req.classes)]
    if req.imbalance:
        unknown = sorted(set(req.imbalance) - set(classes))
        if unknown:
            raise Invalid(
                f"imbalance names classes the model is not trained on: {unknown}",
                field="imbalance",
            )
    params = req.model_dump() | {"dataset_version_id": dv.id, "classes": classes}
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
    encoder_sha256: str | None = None,
) -> ModelVersion:
    """Add a new immutable version (idempotent per training job)."""
    model = repository.lock_or_add(session, model_name)
    existing = version_for_train_job(session, train_job_id)  # looked up under the lock
    if existing is not None:
        return existing
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
            encoder_sha256=encoder_sha256,
        ),
    )


def find_version(
    session: Session,
    model: RegisteredModel | None = None,
    *,
    version_id: int | None = None,
    train_job_id: str | None = None,
    number: int | None = None,
    alias: str | None = None,
    usable: bool = False,
) -> ModelVersion | None:
    """The one way to find a model version (None when there is none).

    By ``version_id``; by the ``train_job_id`` that produced it; or within ``model`` by
    ``number``, by ``alias``, or (neither given) its latest version. ``usable`` leaves
    archived versions out. Callers turn None into the error their request deserves.
    """
    return repository.find_version(
        session,
        version_id=version_id,
        train_job_id=train_job_id,
        model_id=model.id if model is not None else None,
        number=number,
        alias=alias,
        usable=usable,
    )


def list_models(session: Session) -> list[ModelRead]:
    return [ModelRead.model_validate(m) for m in repository.list_models(session)]


def get_model(session: Session, name: str) -> ModelRead:
    m = repository.get_model(session, name, with_tree=True)
    if m is None:
        raise NotFound(f"model {name!r} not found")
    return ModelRead.model_validate(m)


def get_version(session: Session, name: str, version: int) -> ModelVersionRead:
    m = repository.get_model(session, name)
    mv = find_version(session, m, number=version, usable=True) if m else None
    if mv is None:
        raise NotFound(f"model {name!r} version {version} not found")
    return ModelVersionRead.model_validate(mv)


def resolve_version(
    session: Session, name: str, version: int | None, alias: str | None = None
) -> ModelVersion:
    """A usable (not archived) version: by number, by alias, or the latest."""
    m = repository.get_model(session, name)
    if m is None:
        raise Invalid(f"model {name!r} not found", field="model")
    if alias is not None:
        target = find_version(session, m, alias=alias)
        if target is None:
            raise Invalid(f"model {name!r} has no alias {alias!r}", field="alias")
        if target.archived:
            raise Invalid(f"alias {alias!r} points at an archived version", field="alias")
        return target
    mv = find_version(session, m, number=version, usable=True)
    if mv is None:
        raise Invalid(f"model {name!r} has no such version", field="version")
    return mv


def oversample_for(mv: ModelVersion, requested: float | None, settings: Settings) -> float:
    """The oversample factor a synthesis or evaluation of ``mv`` uses: the request's, else
    the site's. Choosing needs the version's supervised quality encoder (the classifier
    it was measured with); a version without one (trained with its quality metrics off)
    keeps every image drawn, and refuses a request that asks for more."""
    if mv.encoder_sha256 is None:
        if requested is not None and requested > 1:
            raise Invalid(
                "this model version has no quality classifier to choose images with (it "
                "was trained without quality metrics); ask for oversample 1",
                field="oversample",
            )
        return 1.0
    return float(requested if requested is not None else settings.synthesis_oversample)


def get_version_by_id(session: Session, version_id: int) -> ModelVersion:
    mv = find_version(session, version_id=version_id)
    if mv is None:
        raise NotFound(f"model version {version_id} not found")
    return mv


def version_for_train_job(session: Session, job_id: str) -> ModelVersion | None:
    """The version a training job registered (None until it has)."""
    return find_version(session, train_job_id=job_id)


def _model(session: Session, name: str) -> RegisteredModel:
    m = repository.get_model(session, name)
    if m is None:
        raise NotFound(f"model {name!r} not found")
    return m


def _version(session: Session, m: RegisteredModel, version: int) -> ModelVersion:
    """Any version of ``m`` by number, archived ones included."""
    mv = find_version(session, m, number=version)
    if mv is None:
        raise NotFound(f"model {m.name!r} version {version} not found")
    return mv


def set_alias(
    session: Session, name: str, alias: str, version: int | None, who: Principal
) -> ModelRead:
    """Point ``alias`` at ``version`` (None removes it); every move is recorded."""
    m = _model(session, name)
    current = repository.get_alias(session, m.id, alias)
    target = _version(session, m, version) if version is not None else None
    if target is not None and target.archived:
        raise Conflict(f"version {version} is archived; an alias cannot point at it")
    from_id = current.version_id if current else None
    if target is None:
        if current is None:
            raise NotFound(f"model {name!r} has no alias {alias!r}")
        repository.delete_alias(session, current)
    elif current is None:
        repository.add_alias(
            session,
            ModelAlias(model_id=m.id, alias=alias, version_id=target.id, moved_by=who.key_id),
        )
    else:
        current.version_id = target.id
        current.moved_by = who.key_id
        current.moved_at = utcnow()
    repository.add_move(
        session,
        ModelAliasMove(
            model_id=m.id,
            alias=alias,
            from_version_id=from_id,
            to_version_id=target.id if target else None,
            moved_by=who.key_id,
            moved_by_name=who.name,
        ),
    )
    audit.record(
        session, who, "move_alias", "model", m.id, "ok", {"alias": alias, "to_version": version}
    )
    session.flush()
    return get_model(session, name)


def alias_history(session: Session, name: str) -> list[AliasMove]:
    m = _model(session, name)
    return [AliasMove.model_validate(move) for move in repository.moves_of(session, m.id)]


def archive(session: Session, name: str, version: int, who: Principal) -> ModelVersionRead:
    """Archive a version: it stays for lineage but can no longer be used or aliased."""
    m = _model(session, name)
    v = _version(session, m, version)
    if any(a.version_id == v.id for a in repository.aliases_of(session, m.id)):
        raise Conflict(f"version {version} still has an alias; move it first")
    v.archived = True
    audit.record(session, who, "archive_version", "model", m.id, "ok", {"version": version})
    session.flush()
    return ModelVersionRead.model_validate(v)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flatten(v, key + ".")
        else:
            out[key] = v
    return out


def compare(session: Session, name: str, a: int, b: int) -> VersionComparison:
    m = _model(session, name)
    va, vb = _version(session, m, a), _version(session, m, b)
    ma, mb = _flatten(va.metrics), _flatten(vb.metrics)
    metrics: dict[str, dict[str, Any]] = {}
    for k in sorted(set(ma) | set(mb)):
        x, y = ma.get(k), mb.get(k)
        row: dict[str, Any] = {"a": x, "b": y}
        if isinstance(x, int | float) and isinstance(y, int | float) and not isinstance(x, bool):
            row["delta"] = y - x
        metrics[k] = row
    ca, cb = _flatten(va.config), _flatten(vb.config)
    changes = {
        k: {"a": ca.get(k), "b": cb.get(k)}
        for k in sorted(set(ca) | set(cb))
        if ca.get(k) != cb.get(k)
    }
    return VersionComparison(model=name, a=a, b=b, metrics=metrics, config_changes=changes)


def weights(session: Session, name: str, version: int, who: Principal) -> ModelVersion:
    m = _model(session, name)
    v = _version(session, m, version)
    audit.record(session, who, "download_weights", "model", m.id, "ok", {"version": version})
    return v


def gallery(session: Session, name: str, version: int, who: Principal) -> str:
    """The sha256 of a version's gallery (generated images beside real held-out ones). It
    shows real radiographs, so every view is audited like the evidence page's."""
    m = _model(session, name)
    v = _version(session, m, version)
    sha = (v.metrics.get("quality") or {}).get("gallery_sha256")
    if not sha:
        raise NotFound(f"model {name!r} version {version} has no gallery (quality not measured)")
    audit.record(session, who, "view_gallery", "model", m.id, "ok", {"version": version})
    return str(sha)


def quality_encoder(
    session: Session, dataset_version_id: int, resolution: int, kind: str = "quality"
) -> QualityEncoder | None:
    return repository.get_encoder(session, dataset_version_id, resolution, kind)


def quality_encoders(session: Session, dataset_version_id: int, kind: str) -> list[QualityEncoder]:
    """Every encoder of ``kind`` of a dataset version, one per resolution, oldest first."""
    return repository.encoders_of_kind(session, dataset_version_id, kind)


def register_encoder(
    session: Session,
    dataset_version_id: int,
    resolution: int,
    blob_sha256: str,
    config: dict[str, Any],
    holdout_accuracy: float | None,
    kind: str = "quality",
) -> QualityEncoder:
    """Keep the first encoder registered for (version, resolution); a concurrent
    training job that trained its own uses the one already registered."""
    existing = repository.get_encoder(session, dataset_version_id, resolution, kind)
    if existing is not None:
        return existing
    return repository.add_encoder(
        session,
        QualityEncoder(
            kind=kind,
            dataset_version_id=dataset_version_id,
            resolution=resolution,
            blob_sha256=blob_sha256,
            config=config,
            holdout_accuracy=holdout_accuracy,
        ),
    )
