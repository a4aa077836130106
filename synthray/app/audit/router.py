from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from synthray.app.audit import service
from synthray.app.audit.schemas import AuditFilter, AuditRead
from synthray.app.deps import ReviewerDep, SessionDep, reads_only

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=list[AuditRead])
@reads_only
def list_audit(
    session: SessionDep,
    _: ReviewerDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    object_type: Annotated[str | None, Query(max_length=40, pattern=r"^[a-z_]+$")] = None,
) -> list[AuditRead]:
    return service.list_events(session, limit, AuditFilter(object_type=object_type))
