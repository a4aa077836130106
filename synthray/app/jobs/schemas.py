from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = {JobState.succeeded, JobState.failed, JobState.cancelled}


class JobKind(StrEnum):
    ingest = "ingest"
    train = "train"
    synthesize = "synthesize"
    check = "check"
    export = "export"
    imagecheck = "imagecheck"
    evaluate = "evaluate"


# Training and synthesis need the accelerator; everything else runs on CPU workers.
QUEUE_OF = {
    JobKind.ingest: "cpu",
    JobKind.train: "gpu",
    JobKind.synthesize: "gpu",
    JobKind.check: "cpu",
    JobKind.export: "cpu",
    JobKind.imagecheck: "cpu",
    JobKind.evaluate: "gpu",  # trains classifiers and samples the generator
}


class Progress(BaseModel):
    step: int
    total: int | None
    message: str
    detail: dict[str, Any]


# Job parameters that name places on the server's disk: the worker needs them, a client
# has no use for them (the dataset's ``source``, relative to the import root, stays).
SERVER_PATHS = frozenset({"folder", "upload_dir"})


class JobRead(BaseModel):
    # Validated from a Job (its four progress columns nested through Job.progress) or from
    # the table's columns (from_row).
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: JobKind
    state: JobState
    progress: Progress
    attempts: int
    max_attempts: int
    cancel_requested: bool
    error: str | None
    result: dict[str, Any]
    params: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> JobRead:
        """From the jobs table's columns (``repository.read``), the progress ones nested."""
        fields = {k: v for k, v in row.items() if not k.startswith("progress_")}
        fields["progress"] = {name: row[f"progress_{name}"] for name in Progress.model_fields}
        return cls.model_validate(fields)

    @classmethod
    def columns(cls) -> list[str]:
        """The jobs table's columns it is made from (``from_row``)."""
        progress = [f"progress_{name}" for name in Progress.model_fields]
        return [n for n in cls.model_fields if n != "progress"] + progress

    @field_validator("params")
    @classmethod
    def _no_server_paths(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {k: val for k, val in v.items() if k not in SERVER_PATHS}
