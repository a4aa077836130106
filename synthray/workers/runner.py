"""Runs one job: claim the row, keep its lease alive, call the handler, record the end."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from synthray.app.db import session_scope, utcnow
from synthray.app.jobs import repository
from synthray.app.jobs.context import JobCancelled, JobFailed
from synthray.app.jobs.schemas import JobKind
from synthray.app.storage import BlobStore
from synthray.config import Settings, get_settings

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
            ok = repository.heartbeat(s, self.job_id, self.owner, utcnow(), self._lease, pending)
            job = repository.get(s, self.job_id) if ok else None
            if job is not None and job.cancel_requested:
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


def _handlers() -> dict[str, Any]:
    from synthray.workers import handlers

    return {
        JobKind.ingest: handlers.ingest,
        JobKind.train: handlers.train,
        JobKind.synthesize: handlers.synthesize,
        JobKind.check: handlers.check,
        JobKind.export: handlers.export,
        JobKind.imagecheck: handlers.imagecheck,
    }


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{time.monotonic_ns()}"


def run(job_id: str, settings: Settings | None = None) -> str:
    """Run a job if this delivery can claim it. Returns what happened (for logs/tests)."""
    settings = settings or get_settings()
    owner = _owner()
    lease = timedelta(seconds=settings.job_lease_seconds)
    with session_scope(settings.sqlalchemy_url) as s:
        claimed = repository.claim(s, job_id, owner, utcnow(), lease)
        job = repository.get(s, job_id) if claimed else None
        if job is not None and job.attempts > job.max_attempts:
            repository.finish(
                s,
                job_id,
                owner,
                utcnow(),
                "failed",
                error=f"gave up after {job.max_attempts} attempts",
            )
            return "gave-up"
        kind, params = (job.kind, dict(job.params)) if job else ("", {})
    if job is None:
        log.info("job %s: nothing to do (finished, cancelled or held by another worker)", job_id)
        return "skipped"

    log.info("job %s (%s): started", job_id, kind)
    handler = _handlers()[kind]
    with WorkerJobContext(settings, job_id, owner, params) as ctx:
        try:
            result = handler(ctx)
            state, values = "succeeded", {"result": result or {}}
            values["progress_message"] = "done"
        except JobCancelled:
            state, values = "cancelled", {"progress_message": "cancelled"}
        except LeaseLost:
            log.warning("job %s: lease lost to another worker; stopping", job_id)
            return "lease-lost"
        except JobFailed as exc:
            state, values = "failed", {"error": str(exc)}
        except Exception as exc:
            # The traceback goes to the worker log without the exception's message,
            # which can carry file names or header values; the job says only the type.
            tb = "".join(traceback.format_tb(exc.__traceback__))
            log.error("job %s failed with %s\n%s", job_id, type(exc).__name__, tb)
            state, values = "failed", {"error": f"internal error ({type(exc).__name__})"}
        with contextlib.suppress(Exception):
            ctx.beat()  # flush the last progress report
        if state != "succeeded":
            _on_failure(ctx, kind, state)
    with session_scope(settings.sqlalchemy_url) as s:
        repository.finish(s, job_id, owner, utcnow(), state, **values)
    log.info("job %s (%s): %s", job_id, kind, state)
    if state == "succeeded":
        _cleanup(ctx.work_dir)
    return state


def _on_failure(ctx: WorkerJobContext, kind: str, state: str) -> None:
    from synthray.workers import handlers

    try:
        handlers.on_failure(ctx, kind, state)
    except Exception as exc:
        log.error("job %s: failure bookkeeping failed: %s", ctx.job_id, type(exc).__name__)


def _cleanup(work_dir: Path) -> None:
    import shutil

    shutil.rmtree(work_dir, ignore_errors=True)
