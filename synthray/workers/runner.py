"""Runs one job: claim the row, keep its lease alive, call the job's module, record the end."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from synthray import logs
from synthray.app.db import session_scope, utcnow
from synthray.app.errors import DomainError, describe_unexpected
from synthray.app.jobs import control
from synthray.app.jobs import service as jobs
from synthray.app.jobs.context import JobCancelled, JobFailed
from synthray.app.jobs.schemas import JobState
from synthray.config import Settings, get_settings
from synthray.workers.context import LeaseLost, WorkerJobContext
from synthray.workers.jobs import HANDLERS

log = logging.getLogger(__name__)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{time.monotonic_ns()}"


def run(job_id: str, settings: Settings | None = None) -> str:
    """Run a job if this delivery can claim it. Returns what happened (for logs/tests)."""
    settings = settings or get_settings()
    owner = _owner()
    lease = timedelta(seconds=settings.job_lease_seconds)
    with session_scope(settings.sqlalchemy_url) as s:
        job = jobs.claim(s, job_id, owner, utcnow(), lease)
        if job is not None and job.attempts > job.max_attempts:
            jobs.finish(
                s,
                job_id,
                owner,
                utcnow(),
                JobState.failed,
                error=f"gave up after {job.max_attempts} attempts",
            )
            control.end_object(s, job, JobState.failed)
            return "gave-up"
        kind, params = (job.kind, dict(job.params)) if job else ("", {})
        request = job.request_id if job else None
    with logs.bound(request=request, job=job_id):
        return _run_claimed(settings, job_id, owner, kind, params) if kind else _skipped(job_id)


def _skipped(job_id: str) -> str:
    log.info("job %s: nothing to do (finished, cancelled or held by another worker)", job_id)
    return "skipped"


def _run_claimed(
    settings: Settings, job_id: str, owner: str, kind: str, params: dict[str, Any]
) -> str:
    log.info("job %s (%s): started", job_id, kind)
    handler = HANDLERS[kind]
    with WorkerJobContext(settings, job_id, owner, params) as ctx:
        values: dict[str, Any]  # column values for jobs.finish
        try:
            result = handler.run(ctx)
            state, values = JobState.succeeded, {"result": result or {}}
            values["progress_message"] = "done"
        except JobCancelled:
            state, values = JobState.cancelled, {"progress_message": "cancelled"}
        except LeaseLost:
            log.warning("job %s: lease lost to another worker; stopping", job_id)
            return "lease-lost"
        except JobFailed as exc:
            state, values = JobState.failed, {"error": str(exc)}
        except DomainError as exc:  # a fixed message of ours, e.g. "batch 7 not found"
            state, values = JobState.failed, {"error": exc.detail}
        except Exception as exc:
            # The traceback goes to the worker log without the exception's message,
            # which can carry file names or header values; the job says only the type.
            tb = "".join(traceback.format_tb(exc.__traceback__))
            log.error("job %s failed with %s\n%s", job_id, type(exc).__name__, tb)
            status, reason, _ = describe_unexpected(exc)
            if status == 500:
                reason = f"internal error ({type(exc).__name__})"
            state, values = JobState.failed, {"error": reason}
        with contextlib.suppress(Exception):
            ctx.beat()  # flush the last progress report
        if state != JobState.succeeded and handler.on_failure is not None:
            try:
                handler.on_failure(ctx, state)
            except Exception as exc:
                log.error("job %s: failure bookkeeping failed: %s", job_id, type(exc).__name__)
    _record_end(settings, job_id, owner, state, values)
    log.info("job %s (%s): %s", job_id, kind, state)
    if state == JobState.succeeded:
        _cleanup(ctx.work_dir)
    return str(state)


FINISH_RETRIES_S = (1, 2, 4, 8, 15)


def _record_end(
    settings: Settings, job_id: str, owner: str, state: JobState, values: dict[str, Any]
) -> None:
    """Write the job's end, retrying for half a minute while the database (or the disk
    under SQLite) refuses. If it still cannot, the lease runs out and the sweeper hands
    the job to the next delivery, which resumes from the last checkpoint."""
    for wait in (*FINISH_RETRIES_S, None):
        try:
            with session_scope(settings.sqlalchemy_url) as s:
                jobs.finish(s, job_id, owner, utcnow(), state, **values)
            return
        except (SQLAlchemyError, OSError) as exc:
            if wait is None:
                raise
            log.warning(
                "job %s: recording its end failed (%s); retrying in %d s",
                job_id,
                type(exc).__name__,
                wait,
            )
            time.sleep(wait)


def _cleanup(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
