from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import FileResponse

from synthray.app.auth.schemas import Principal
from synthray.app.deps import (
    BlobsDep,
    CallerDep,
    CurrentPrincipal,
    OperatorDep,
    ReviewerDep,
    SessionDep,
    SettingsDep,
    commits,
    reads_only,
    writes_on_read,
)
from synthray.app.errors import Forbidden, Unauthorized
from synthray.app.exports import service
from synthray.app.exports.schemas import (
    ExportAccepted,
    ExportCreate,
    ExportRead,
    RejectBody,
    ReviewBody,
)
from synthray.app.fields import RowId

router = APIRouter(prefix="/exports", tags=["exports"])


@router.post("", response_model=ExportAccepted, status_code=status.HTTP_202_ACCEPTED)
@commits
def request_export(
    body: ExportCreate, session: SessionDep, settings: SettingsDep, who: OperatorDep
) -> ExportAccepted:
    """Build a bundle from a batch that passed the memorization gate (409 otherwise)."""
    return service.request_export(session, settings, body, who)


@router.get("", response_model=list[ExportRead])
@reads_only
def list_exports(
    session: SessionDep,
    who: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[ExportRead]:
    """Partners see only the exports addressed to them."""
    return service.list_exports(session, who, limit)


@router.get("/{export_id}", response_model=ExportRead)
@reads_only
def get_export(export_id: RowId, session: SessionDep, who: CurrentPrincipal) -> ExportRead:
    return service.read(service.get(session, export_id, who), who)


@router.post("/{export_id}/approve", response_model=ExportRead)
def approve_export(
    export_id: RowId,
    session: SessionDep,
    settings: SettingsDep,
    who: ReviewerDep,
    body: ReviewBody | None = None,
) -> ExportRead:
    """One approval. The export is approved once SYNTHRAY_EXPORT_APPROVALS distinct keys
    other than the requester's have approved it (two-person rule, admins included)."""
    comment = body.comment if body else ""
    e = service.approve(session, settings, export_id, who, comment)
    return service.read(e, who)


@router.post("/{export_id}/reject", response_model=ExportRead)
def reject_export(
    export_id: RowId, body: RejectBody, session: SessionDep, who: ReviewerDep
) -> ExportRead:
    """Refuse the export for good, with the reason (shown to staff, never to the partner)."""
    return service.read(service.reject(session, export_id, who, body.comment), who)


def _downloader(request: Request, session: SessionDep, who: CallerDep) -> Principal:
    """The caller; a download attempt without a valid key is audited before its 401 (and
    before the id is validated, so that every /v1 route answers 401 first)."""
    if isinstance(who, Unauthorized | Forbidden):
        service.refuse_unauthenticated(session, str(request.path_params["export_id"]), who)
    return who


@router.get(
    "/{export_id}/download",
    response_class=FileResponse,
    responses={200: {"content": {"application/zip": {}}}},
)
@writes_on_read
def download_export(
    export_id: RowId,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    blobs: BlobsDep,
    who: Annotated[Principal, Depends(_downloader)],
) -> FileResponse:
    """The approved bundle, to its partner or an admin. Every attempt is audited, those
    without a valid key included. A broken download resumes with ``Range: bytes=N-`` (and
    ``If-Range`` with the ETag, the bundle's sha256), which is not a new download."""
    start = service.range_start(request.headers.get("range"))
    path, e = service.open_download(session, settings, blobs, export_id, who, start)
    sha = e.bundle_sha256 or ""
    return FileResponse(
        path,
        media_type="application/zip",
        filename=f"synthray-export-{e.id}.zip",
        headers={"X-Content-SHA256": sha, "ETag": f'"{sha}"'},
    )
