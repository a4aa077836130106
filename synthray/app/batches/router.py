from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from fastapi.responses import HTMLResponse

from synthray.app.audit import service as audit
from synthray.app.batches import service
from synthray.app.batches.report_html import evidence_response
from synthray.app.batches.schemas import BatchRead, SynthesizeAccepted, SynthesizeRequest
from synthray.app.deps import (
    BlobsDep,
    OperatorDep,
    SessionDep,
    SettingsDep,
    StaffDep,
    commits,
    reads_only,
    writes_on_read,
)
from synthray.app.fields import RowId

router = APIRouter(tags=["batches"])


@router.post("/synthesize", response_model=SynthesizeAccepted, status_code=status.HTTP_202_ACCEPTED)
@commits
def synthesize(
    body: SynthesizeRequest, session: SessionDep, settings: SettingsDep, who: OperatorDep
) -> SynthesizeAccepted:
    """Queue sampling of a batch; its memorization check is queued when sampling ends."""
    return service.request_synthesis(session, settings, body, who.key_id)


@router.get("/batches", response_model=list[BatchRead])
@reads_only
def list_batches(
    session: SessionDep, _: StaffDep, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> list[BatchRead]:
    return service.list_batches(session, limit)


@router.get("/batches/{batch_id}", response_model=BatchRead)
@reads_only
def get_batch(batch_id: RowId, session: SessionDep, _: StaffDep) -> BatchRead:
    return BatchRead.model_validate(service.get(session, batch_id))


@router.get("/batches/{batch_id}/report")
def get_report(
    batch_id: RowId, session: SessionDep, blobs: BlobsDep, _: StaffDep
) -> dict[str, Any]:
    """The memorization report: policy, calibration, and every image's neighbours."""
    return service.report(session, blobs, batch_id)


@router.get("/batches/{batch_id}/report.html", response_class=HTMLResponse)
@writes_on_read
def get_report_html(
    batch_id: RowId, session: SessionDep, blobs: BlobsDep, who: StaffDep
) -> HTMLResponse:
    """The evidence page: flagged images beside their nearest training images. It shows
    real training images, so it is staff-only and every view is audited."""
    page = service.report_html(session, blobs, batch_id)
    audit.record(session, who, "view_evidence", "batch", batch_id, "ok")
    return evidence_response(page)
