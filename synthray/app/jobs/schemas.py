from __future__ import annotations

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
    # Validated from a row; its four progress columns come nested through Job.progress.
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

    @field_validator("params")
    @classmethod
    def _no_server_paths(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {k: val for k, val in v.items() if k not in SERVER_PATHS}
