from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from synthray.app.fields import Id32, Name, RequestModel


class ImageCheckState(StrEnum):
    """queued -> checking -> done; a check job that fails or is cancelled leaves its end
    state."""

    queued = "queued"
    checking = "checking"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class ImageCheckCreate(RequestModel):
    dataset: Name
    version: Id32 | None = Field(None, description="Latest ready version if omitted.")
    resolution: Literal[64, 128, 256] | None = Field(
        None, description="Resolution to compare at (the version's smallest if omitted)."
    )


class ImageCheckAccepted(BaseModel):
    check_id: int
    job_id: str


class ImageCheckRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    dataset_version_id: int
    resolution: int
    state: ImageCheckState
    summary: dict[str, Any]
    job_id: str | None
    created_at: datetime
