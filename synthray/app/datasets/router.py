from __future__ import annotations

from fastapi import APIRouter, Request, status

from synthray.app.datasets import service, uploads
from synthray.app.datasets.schemas import DatasetCreate, DatasetRead, IngestAccepted
from synthray.app.deps import (
    OperatorDep,
    SessionDep,
    SettingsDep,
    StaffDep,
    commits,
    multipart_body,
    reads_only,
)
from synthray.app.fields import NameParam

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", response_model=IngestAccepted, status_code=status.HTTP_202_ACCEPTED)
@commits
def create_dataset_version(
    body: DatasetCreate, session: SessionDep, settings: SettingsDep, who: OperatorDep
) -> IngestAccepted:
    """Queue an ingest of a folder under the import root as a new dataset version."""
    return service.request_ingest(session, settings, body, who.key_id)


@router.get("", response_model=list[DatasetRead])
@reads_only
def list_datasets(session: SessionDep, _: StaffDep) -> list[DatasetRead]:
    return service.list_datasets(session)


@router.get("/{name}", response_model=DatasetRead)
@reads_only
def get_dataset(name: NameParam, session: SessionDep, _: StaffDep) -> DatasetRead:
    return service.get_dataset(session, name)


@router.post(
    "/upload",
    response_model=IngestAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=multipart_body("spec", "DatasetCreate as JSON"),
)
async def upload_dataset_version(
    request: Request, session: SessionDep, settings: SettingsDep, who: OperatorDep
) -> IngestAccepted:
    """Upload a zip (or one DICOM/PNG/JPEG file) and queue its ingest as a new version.

    The body is streamed to disk and cut off at SYNTHRAY_MAX_UPLOAD_BYTES (413); the
    zip is unpacked under the limits of ``unpack.extract_zip``. The uploaded files are
    deleted when the ingest ends.
    """
    return await uploads.accept(
        request,
        session,
        settings,
        uploads.json_field("spec", DatasetCreate),
        lambda folder, spec: service.request_ingest(
            session, settings, spec, who.key_id, upload_dir=folder
        ),
    )
