"""What a service running inside a job may use: the job's parameters, progress
reporting, cancellation, and short database transactions of its own.

Workers implement it; services depend only on this protocol, so the arrow stays
``workers -> app services``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import Session

from synthray.app.storage import BlobStore
from synthray.config import Settings


class JobFailed(Exception):
    """A job cannot succeed for a reason the user can act on (shown as the job's error).

    The message must name files by their position in the upload, never by patient data.
    """


class JobCancelled(Exception):
    """Raised by a service when it saw a cancellation request and stopped cleanly."""


class JobContext(Protocol):
    job_id: str
    params: dict[str, Any]
    settings: Settings
    blobs: BlobStore
    work_dir: Path

    def progress(
        self, step: int, total: int | None, message: str, detail: dict[str, Any] | None = None
    ) -> None: ...

    def should_stop(self) -> bool: ...

    def session(self) -> AbstractContextManager[Session]: ...
