from __future__ import annotations

from fastapi import APIRouter, status

from synthray.app.deps import OperatorDep, SessionDep, SettingsDep, StaffDep
from synthray.app.registry import service
from synthray.app.registry.schemas import ModelRead, ModelVersionRead, TrainAccepted, TrainRequest

router = APIRouter(tags=["registry"])


@router.post("/train", response_model=TrainAccepted, status_code=status.HTTP_202_ACCEPTED)
def train(
    body: TrainRequest, session: SessionDep, settings: SettingsDep, who: OperatorDep
) -> TrainAccepted:
    """Queue a training job; the generator is registered as a new version when it ends."""
    return service.request_training(session, settings, body, who.key_id)


@router.get("/models", response_model=list[ModelRead])
def list_models(session: SessionDep, _: StaffDep) -> list[ModelRead]:
    return service.list_models(session)


@router.get("/models/{name}", response_model=ModelRead)
def get_model(name: str, session: SessionDep, _: StaffDep) -> ModelRead:
    return service.get_model(session, name)


@router.get("/models/{name}/versions/{version}", response_model=ModelVersionRead)
def get_model_version(
    name: str, version: int, session: SessionDep, _: StaffDep
) -> ModelVersionRead:
    return service.get_version(session, name, version)
