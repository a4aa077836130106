from __future__ import annotations

from fastapi import APIRouter, status

from synthray.app.datasets import service
from synthray.app.datasets.schemas import DatasetCreate, DatasetRead, IngestAccepted
from synthray.app.deps import OperatorDep, SessionDep, SettingsDep, StaffDep

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", response_model=IngestAccepted, status_code=status.HTTP_202_ACCEPTED)
def create_dataset_version(
    body: DatasetCreate, session: SessionDep, settings: SettingsDep, who: OperatorDep
) -> IngestAccepted:
    """Queue an ingest of a folder under the import root as a new dataset version."""
    return service.request_ingest(session, settings, body, who.key_id)


@router.get("", response_model=list[DatasetRead])
def list_datasets(session: SessionDep, _: StaffDep) -> list[DatasetRead]:
    return service.list_datasets(session)


@router.get("/{name}", response_model=DatasetRead)
def get_dataset(name: str, session: SessionDep, _: StaffDep) -> DatasetRead:
    return service.get_dataset(session, name)
