from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from synthray.app.datasets.schemas import NAME


class ExportCreate(BaseModel):
    batch_id: int
    partner: str = Field(pattern=NAME, description="Name of the partner's API key.")


class ExportAccepted(BaseModel):
    export_id: int
    job_id: str


class ExportRead(BaseModel):
    id: int
    batch_id: int
    partner: str
    state: str
    bundle_sha256: str | None
    size_bytes: int | None
    image_count: int | None
    build_job_id: str | None
    approved_at: datetime | None
    created_at: datetime
