from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from synthray.app.fields import NAME, Id32, RequestModel


class ExportState(StrEnum):
    """building -> awaiting_approval -> approved or rejected; a build job that fails or is
    cancelled leaves its end state."""

    building = "building"
    awaiting_approval = "awaiting_approval"
    approved = "approved"
    rejected = "rejected"
    failed = "failed"
    cancelled = "cancelled"


class ExportCreate(RequestModel):
    batch_id: Id32
    partner: str = Field(max_length=100, pattern=NAME, description="Name of the partner's API key.")


class ReviewBody(RequestModel):
    comment: str = Field(
        "", max_length=2000, description="Why (required to reject; kept with the review)."
    )


class RejectBody(ReviewBody):
    comment: str = Field(min_length=1, max_length=2000, description="Why the export is refused.")


class ExportReviewRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    reviewer_key_id: int
    reviewer_name: str
    decision: str
    comment: str
    at: datetime


class ExportAccepted(BaseModel):
    export_id: int
    job_id: str


class ExportRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    batch_id: int
    partner: str
    state: ExportState
    bundle_sha256: str | None
    size_bytes: int | None
    image_count: int | None
    build_job_id: str | None
    approved_at: datetime | None
    created_at: datetime
    requested_by: int | None = None
    reviews: list[ExportReviewRead] = Field(
        default_factory=list, description="Approvals and rejections (staff only)."
    )
