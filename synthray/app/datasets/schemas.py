from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"


class DatasetCreate(BaseModel):
    """Import a folder of PNG/JPEG radiographs with a labels CSV, from the import root.

    Each CSV row names a file (relative to ``source``), its label(s) and its patient.
    Rows whose labels map to exactly one class of ``classes`` are kept; the others are
    skipped with a recorded reason.
    """

    name: str = Field(pattern=NAME)
    source: str = Field(min_length=1, description="Folder relative to SYNTHRAY_IMPORT_ROOT.")
    labels_csv: str = "labels.csv"
    file_column: str = "file"
    label_column: str = "label"
    patient_column: str = "patient_id"
    label_separator: str | None = Field(None, max_length=3)
    label_map: dict[str, str] = Field(default_factory=dict)
    classes: list[str] = Field(min_length=2, max_length=64)
    view_column: str | None = None
    sex_column: str | None = None
    age_column: str | None = None
    resolution: Literal[64, 128, 256] = 64
    holdout_fraction: float = Field(0.2, ge=0.05, le=0.5)
    split_seed: int = 0

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        if any(not c.strip() for c in v):
            raise ValueError("class names must not be empty")
        return v

    @model_validator(mode="after")
    def _mapped_classes(self) -> DatasetCreate:
        unknown = sorted(set(self.label_map.values()) - set(self.classes))
        if unknown:
            raise ValueError(f"label_map maps to classes not in 'classes': {unknown}")
        return self


class DatasetVersionRead(BaseModel):
    id: int
    dataset: str
    version: int
    state: str
    content_sha256: str | None
    resolution: int
    classes: list[str]
    counts: dict[str, Any]
    holdout_fraction: float
    split_seed: int
    ingest_job_id: str | None
    created_at: datetime


class DatasetRead(BaseModel):
    id: int
    name: str
    created_at: datetime
    versions: list[DatasetVersionRead]


class IngestAccepted(BaseModel):
    dataset: str
    version: int
    job_id: str
