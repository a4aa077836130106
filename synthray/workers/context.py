"""The job context a worker hands to a job: parameters, progress, cancellation, and a
heartbeat thread that keeps the job's lease alive (:class:`WorkerJobContext`).

It implements :class:`synthray.app.jobs.context.JobContext`; job modules are typed against
that protocol, so they never depend on this module.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from synthray.app.db import session_scope, utcnow
from synthray.app.jobs import service as jobs
from synthray.app.storage import BlobStore
from synthray.config import Settings

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker took the job over (our lease expired); stop without recording."""


class WorkerJobContext:
    """The JobContext a handler gets: progress, cancellation, lease heartbeats."""

    def __init__(self, settings: Settings, job_id: str, owner: str, params: dict[str, Any]):
        self.settings = settings
        self.job_id = job_id
        self.owner = owner
        self.params = params
        self.blobs = BlobStore(settings.blob_dir)
        self.work_dir = settings.work_dir / "jobs" / job_id
        self._lease = timedelta(seconds=settings.job_lease_seconds)
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._detail: dict[str, Any] = {}
        self._cancel = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_loop, name="job-heartbeat", daemon=True)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.settings.sqlalchemy_url) as s:
            yield s

    def progress(
        self, step: int, total: int | None, message: str, detail: dict[str, Any] | None = None
    ) -> None:
        with self._lock:
            # Details accumulate over the job (the last losses, the latest preview stay
            # visible while a later phase reports its own figures).
            self._detail = {**self._detail, **(detail or {})}
            self._pending = {
                "step": int(step),
                "total": None if total is None else int(total),
                "message": message,
                "detail": dict(self._detail),
            }
        if self._lost.is_set():
            raise LeaseLost()

    def should_stop(self) -> bool:
        if self._lost.is_set():
            raise LeaseLost()
        return self._cancel.is_set()

    def beat(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        with self.session() as s:
            ok, cancel = jobs.heartbeat(s, self.job_id, self.owner, utcnow(), self._lease, pending)
        if cancel:
            self._cancel.set()
        if not ok:
            self._lost.set()

    def _beat_loop(self) -> None:
        interval = min(5.0, self.settings.job_lease_seconds / 4)
        while not self._stop.wait(interval):
            try:
                self.beat()
            except Exception as exc:  # a missed beat is retried; the lease has slack
                log.warning("heartbeat failed for job %s: %s", self.job_id, type(exc).__name__)

    def __enter__(self) -> WorkerJobContext:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
