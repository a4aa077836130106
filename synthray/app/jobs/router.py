from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from synthray.app.deps import (
    BlobsDep,
    OperatorDep,
    SessionDep,
    SettingsDep,
    StaffDep,
    reads_only,
)
from synthray.app.errors import NotFound
from synthray.app.fields import JobIdParam
from synthray.app.jobs import control, service
from synthray.app.jobs.schemas import JobKind, JobRead, JobState

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("", response_model=list[JobRead])
@reads_only
def list_jobs(
    session: SessionDep,
    _: StaffDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    kind: JobKind | None = None,
    state: JobState | None = None,
) -> list[JobRead]:
    return service.list_jobs(
        session, limit, kind.value if kind else None, state.value if state else None
    )


@router.get("/{job_id}", response_model=JobRead)
@reads_only
def get_job(job_id: JobIdParam, session: SessionDep, _: StaffDep) -> JobRead:
    return service.read(session, job_id)


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: JobIdParam, session: SessionDep, _: OperatorDep) -> JobRead:
    return JobRead.model_validate(control.cancel(session, job_id))


@router.post("/{job_id}/retry", response_model=JobRead)
def retry_job(
    job_id: JobIdParam, session: SessionDep, settings: SettingsDep, who: OperatorDep
) -> JobRead:
    """Queue a failed or cancelled job again under the same id (409 with the reason when it
    cannot be: still queued or running, its uploads gone, or its object moved on)."""
    return JobRead.model_validate(control.retry(session, settings, job_id, who))


@router.get(
    "/{job_id}/preview.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def get_preview(job_id: JobIdParam, session: SessionDep, blobs: BlobsDep, _: StaffDep) -> Response:
    """The latest preview grid of a training job (one row per class)."""
    job = service.get(session, job_id)
    sha = job.progress_detail.get("preview_sha256") if job.progress_detail else None
    if not sha:
        raise NotFound(f"job {job_id} has no preview yet")
    return Response(blobs.read_bytes(sha), media_type="image/png")
