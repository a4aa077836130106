from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from fastapi.responses import HTMLResponse

from synthray.app.audit import service as audit
from synthray.app.batches.report_html import evidence_response
from synthray.app.datasets import uploads
from synthray.app.deps import (
    BlobsDep,
    OperatorDep,
    SessionDep,
    SettingsDep,
    StaffDep,
    multipart_body,
    reads_only,
    writes_on_read,
)
from synthray.app.fields import RowId
from synthray.app.imagechecks import service
from synthray.app.imagechecks.schemas import (
    ImageCheckAccepted,
    ImageCheckCreate,
    ImageCheckRead,
)

router = APIRouter(prefix="/image-checks", tags=["image checks"])


@router.post(
    "",
    response_model=ImageCheckAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=multipart_body("check", "ImageCheckCreate JSON"),
)
async def create_image_check(
    request: Request, session: SessionDep, settings: SettingsDep, who: OperatorDep
) -> ImageCheckAccepted:
    """Check uploaded images (a zip of PNG/JPEG/DICOM) against a dataset version's
    training images. The same gate as for synthetic batches; nothing checked here can
    ever be exported."""
    return await uploads.accept(
        request,
        session,
        settings,
        uploads.json_field("check", ImageCheckCreate),
        lambda folder, req: service.request_check(session, settings, req, folder, who),
    )


@router.get("/{check_id}", response_model=ImageCheckRead)
@reads_only
def get_image_check(check_id: RowId, session: SessionDep, _: StaffDep) -> ImageCheckRead:
    return ImageCheckRead.model_validate(service.get(session, check_id))


@router.get("/{check_id}/report")
def get_image_check_report(
    check_id: RowId, session: SessionDep, blobs: BlobsDep, _: StaffDep
) -> dict[str, Any]:
    data: dict[str, Any] = service.report(session, blobs, check_id, html=False)
    return data


@router.get("/{check_id}/report.html", response_class=HTMLResponse)
@writes_on_read
def get_image_check_report_html(
    check_id: RowId, session: SessionDep, blobs: BlobsDep, who: StaffDep
) -> HTMLResponse:
    page = service.report(session, blobs, check_id, html=True)
    audit.record(session, who, "view_evidence", "image_check", check_id, "ok")
    return evidence_response(page)
