from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class ImageCheckCreate(BaseModel):
    dataset: str
    version: int | None = Field(None, description="Latest ready version if omitted.")
    resolution: Literal[64, 128, 256] | None = Field(
        None, description="Resolution to compare at (the version's smallest if omitted)."
    )


class ImageCheckAccepted(BaseModel):
    check_id: int
    job_id: str


class ImageCheckRead(BaseModel):
    id: int
    dataset_version_id: int
    resolution: int
    state: str
    summary: dict[str, Any]
    job_id: str | None
    created_at: datetime
