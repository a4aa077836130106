from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AliasPath,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    field_validator,
    model_validator,
)

from synthray.app.fields import (
    MAX_CLASSES,
    MAX_LABEL_MAP,
    Column,
    Flag,
    Label,
    Name,
    RelPath,
    RequestModel,
    Seed,
)


class DatasetVersionState(StrEnum):
    """ingesting -> ready; an ingest job that fails or is cancelled leaves its end state."""

    ingesting = "ingesting"
    ready = "ready"
    failed = "failed"
    cancelled = "cancelled"


def _default_resolutions() -> list[Literal[64, 128, 256]]:
    return [64]


class DatasetCreate(RequestModel):
    """Import radiographs (DICOM, PNG or JPEG) as a new, immutable dataset version.

    Labels come from one of three places:

    - a CSV keyed by file name (``file_column``, paths relative to the folder);
    - a CSV keyed by DICOM SOPInstanceUID (``sop_column``; every file of the folder is read);
    - a DICOM attribute (``label_attribute``, e.g. ``StudyDescription``), with no CSV.

    Raw labels go through ``label_map`` and may hold several labels split by
    ``label_separator``; an image is kept when exactly one maps into ``classes``.
    Patients come from ``patient_column`` or, when it is unset, from DICOM PatientID.
    """

    name: Name
    source: RelPath = Field("", description="Folder relative to SYNTHRAY_IMPORT_ROOT.")
    labels_csv: RelPath | None = "labels.csv"
    file_column: Column | None = "file"
    sop_column: Column | None = None
    label_column: Column | None = "label"
    label_attribute: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z]{1,64}$")
    patient_column: Column | None = "patient_id"
    label_separator: str | None = Field(None, max_length=3)
    label_map: dict[Annotated[str, Field(max_length=200)], Label] = Field(
        default_factory=dict, max_length=MAX_LABEL_MAP
    )
    classes: list[Label] = Field(min_length=2, max_length=MAX_CLASSES)
    view_column: Column | None = None
    sex_column: Column | None = None
    age_column: Column | None = None
    resolutions: list[Literal[64, 128, 256]] = Field(
        default_factory=_default_resolutions, min_length=1, max_length=3
    )
    holdout_fraction: StrictFloat = Field(0.2, ge=0.05, le=0.5)
    split_seed: Seed = 0
    allow_burned_in: Flag = Field(
        False, description="Accept DICOM files that declare BurnedInAnnotation YES."
    )

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        if any(not c.strip() for c in v):
            raise ValueError("class names must not be empty")
        return v

    @field_validator("resolutions")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        return sorted(set(v))

    @model_validator(mode="after")
    def _consistent(self) -> DatasetCreate:
        unknown = sorted(set(self.label_map.values()) - set(self.classes))
        if unknown:
            raise ValueError(f"label_map maps to classes not in 'classes': {unknown}")
        if self.label_attribute:
            if self.labels_csv:
                raise ValueError("use either label_attribute or labels_csv, not both")
            if self.patient_column:
                raise ValueError("without a CSV, patients come from DICOM: unset patient_column")
        else:
            if not self.labels_csv or not self.label_column:
                raise ValueError("give labels_csv with label_column, or label_attribute")
            if bool(self.file_column) == bool(self.sop_column):
                raise ValueError("key the labels CSV by exactly one of file_column, sop_column")
        return self

    @property
    def walks_folder(self) -> bool:
        """True when every file of the folder is read (labels not keyed by file name)."""
        return bool(self.label_attribute or self.sop_column)


class DatasetVersionRead(BaseModel):
    # Validated from a row (``dataset`` is its dataset's name) or, by field name, from
    # its own dump.
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: int
    dataset: str = Field(validation_alias=AliasPath("dataset", "name"))
    version: int
    state: DatasetVersionState
    content_sha256: str | None
    resolutions: list[int]
    classes: list[str]
    counts: dict[str, Any]
    holdout_fraction: float
    split_seed: int
    ingest_job_id: str | None
    created_at: datetime


class DatasetRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    created_at: datetime
    versions: list[DatasetVersionRead]


class IngestAccepted(BaseModel):
    dataset: str
    version: int
    job_id: str
