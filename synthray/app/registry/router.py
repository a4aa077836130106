from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import FileResponse, Response

from synthray.app.deps import (
    AdminDep,
    BlobsDep,
    OperatorDep,
    ReviewerDep,
    SessionDep,
    SettingsDep,
    StaffDep,
    commits,
    reads_only,
    writes_on_read,
)
from synthray.app.fields import AliasParam, NameParam, VersionNo, VersionQuery
from synthray.app.registry import service
from synthray.app.registry.schemas import (
    AliasMove,
    AliasSet,
    ModelRead,
    ModelVersionRead,
    TrainAccepted,
    TrainRequest,
    VersionComparison,
)

router = APIRouter(tags=["registry"])


@router.post("/train", response_model=TrainAccepted, status_code=status.HTTP_202_ACCEPTED)
@commits
def train(
    body: TrainRequest, session: SessionDep, settings: SettingsDep, who: OperatorDep
) -> TrainAccepted:
    """Queue a training job; the generator is registered as a new version when it ends."""
    return service.request_training(session, settings, body, who.key_id)


@router.get("/models", response_model=list[ModelRead])
@reads_only
def list_models(session: SessionDep, _: StaffDep) -> list[ModelRead]:
    return service.list_models(session)


@router.get("/models/{name}", response_model=ModelRead)
@reads_only
def get_model(name: NameParam, session: SessionDep, _: StaffDep) -> ModelRead:
    return service.get_model(session, name)


@router.get("/models/{name}/versions/{version}", response_model=ModelVersionRead)
@reads_only
def get_model_version(
    name: NameParam, version: VersionNo, session: SessionDep, _: StaffDep
) -> ModelVersionRead:
    return service.get_version(session, name, version)


@router.put("/models/{name}/aliases/{alias}", response_model=ModelRead)
def set_alias(
    name: NameParam,
    alias: AliasParam,
    body: AliasSet,
    session: SessionDep,
    who: ReviewerDep,
) -> ModelRead:
    """Point an alias (e.g. ``candidate``, ``approved``) at a version, or remove it."""
    return service.set_alias(session, name, alias, body.version, who)


@router.get("/models/{name}/aliases/history", response_model=list[AliasMove])
@reads_only
def alias_history(name: NameParam, session: SessionDep, _: StaffDep) -> list[AliasMove]:
    return service.alias_history(session, name)


@router.post("/models/{name}/versions/{version}/archive", response_model=ModelVersionRead)
def archive_version(
    name: NameParam, version: VersionNo, session: SessionDep, who: OperatorDep
) -> ModelVersionRead:
    return service.archive(session, name, version, who)


@router.get("/models/{name}/compare", response_model=VersionComparison)
@reads_only
def compare_versions(
    name: NameParam, a: VersionQuery, b: VersionQuery, session: SessionDep, _: StaffDep
) -> VersionComparison:
    """Two versions' metrics side by side (with deltas) and the config keys that differ."""
    return service.compare(session, name, a, b)


@router.get(
    "/models/{name}/versions/{version}/gallery.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
@writes_on_read
def get_gallery(
    name: NameParam, version: VersionNo, session: SessionDep, blobs: BlobsDep, who: StaffDep
) -> Response:
    """Per class, generated images beside real images of held-out patients. It shows real
    radiographs, so it is staff-only and every view is audited."""
    sha = service.gallery(session, name, version, who)
    return Response(
        blobs.read_bytes(sha), media_type="image/png", headers={"Cache-Control": "no-store"}
    )


@router.get(
    "/models/{name}/versions/{version}/weights",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
@writes_on_read
def download_weights(
    name: NameParam, version: VersionNo, session: SessionDep, blobs: BlobsDep, who: AdminDep
) -> FileResponse:
    """The generator file (safetensors with its config). Admin only; hash verified."""
    v = service.weights(session, name, version, who)
    path = blobs.open_verified(v.blob_sha256)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{name}-v{version}.safetensors",
        headers={"X-Content-SHA256": v.blob_sha256},
    )
