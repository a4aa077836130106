from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status

from synthray.app.deps import (
    BlobsDep,
    OperatorDep,
    SessionDep,
    SettingsDep,
    StaffDep,
    commits,
    reads_only,
)
from synthray.app.evaluations import service
from synthray.app.evaluations.schemas import (
    EvaluationAccepted,
    EvaluationCreate,
    EvaluationRead,
)
from synthray.app.fields import NAME, RowId, VersionQuery
from synthray.app.registry import service as registry

router = APIRouter(prefix="/evaluations", tags=["evaluations"])


@router.post("", response_model=EvaluationAccepted, status_code=status.HTTP_202_ACCEPTED)
@commits
def create_evaluation(
    req: EvaluationCreate, session: SessionDep, settings: SettingsDep, who: OperatorDep
) -> EvaluationAccepted:
    """Measure whether a generator's images help a classifier (the arms of
    Salehinejad et al. 2018, plus classic augmentation, an even mix and synthetic
    pre-training), over several seeds, on real images of unseen patients."""
    return service.request_evaluation(session, settings, req, who)


@router.get("", response_model=list[EvaluationRead])
@reads_only
def list_evaluations(
    session: SessionDep,
    _: StaffDep,
    model: Annotated[str, Query(min_length=1, max_length=100, pattern=NAME)],
    version: VersionQuery,
) -> list[EvaluationRead]:
    """The evaluations of one generator version, newest first."""
    mv = registry.get_version(session, model, version)
    return [EvaluationRead.model_validate(e) for e in service.for_version(session, mv.id)]


@router.get("/{evaluation_id}", response_model=EvaluationRead)
@reads_only
def get_evaluation(evaluation_id: RowId, session: SessionDep, _: StaffDep) -> EvaluationRead:
    return EvaluationRead.model_validate(service.get(session, evaluation_id))


@router.get("/{evaluation_id}/result")
def get_evaluation_result(
    evaluation_id: RowId, session: SessionDep, blobs: BlobsDep, _: StaffDep
) -> dict[str, Any]:
    """Every arm and seed, the intervals, the differences to DS1 and the lineage."""
    data: dict[str, Any] = json.loads(service.artefact(session, blobs, evaluation_id, "result"))
    return data


@router.get("/{evaluation_id}/result.csv")
def get_evaluation_csv(
    evaluation_id: RowId, session: SessionDep, blobs: BlobsDep, _: StaffDep
) -> Response:
    body = service.artefact(session, blobs, evaluation_id, "csv")
    return Response(
        body,
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="evaluation-{evaluation_id}.csv"'},
    )


@router.get("/{evaluation_id}/chart.png")
def get_evaluation_chart(
    evaluation_id: RowId, session: SessionDep, blobs: BlobsDep, _: StaffDep
) -> Response:
    chart = service.artefact(session, blobs, evaluation_id, "chart")
    return Response(chart, media_type="image/png")
