"""An operator's control over jobs: cancelling and retrying them, with the objects they
work on kept in step.

Cancelling a queued job ends it at once; the object it was to work on takes the state a
cancelled run leaves, and files uploaded for it (originals not yet de-identified) are
deleted once the cancel is committed. A running job stops at its next heartbeat, and its
worker does the same bookkeeping; if its worker was lost, the sweeper (which also lives
here: :func:`requeue_stale`) ends it when the lease runs out instead of queueing it again.

Retrying: a job that failed (its worker was lost too often, a fault since fixed, a disk that
filled) or was cancelled is queued again under the same id, with its attempts counted
from zero; a training job resumes from its last checkpoint while its scratch folder is
kept (``job_files_retention_days`` after it ended). The object the job worked on goes
back to the state it had while the job was queued, so a job cannot be retried once
something else has moved that object on. Jobs over uploaded files cannot be retried:
the uploads are deleted when such a job ends.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from synthray.app.audit import service as audit
from synthray.app.auth.schemas import Principal
from synthray.app.batches import repository as batches
from synthray.app.batches import service as batch_service
from synthray.app.batches.schemas import BatchState
from synthray.app.datasets import repository as datasets
from synthray.app.datasets import service as dataset_service
from synthray.app.datasets.schemas import DatasetVersionState
from synthray.app.db import on_commit, utcnow
from synthray.app.errors import Conflict
from synthray.app.evaluations import repository as evaluations
from synthray.app.evaluations import service as evaluation_service
from synthray.app.evaluations.schemas import EvaluationState
from synthray.app.exports import repository as exports
from synthray.app.exports import service as export_service
from synthray.app.exports.schemas import ExportState
from synthray.app.imagechecks import repository as imagechecks
from synthray.app.imagechecks import service as imagecheck_service
from synthray.app.imagechecks.schemas import ImageCheckState
from synthray.app.jobs import repository, service
from synthray.app.jobs.schemas import TERMINAL, JobKind, JobState
from synthray.app.jobs.tables import Job
from synthray.config import Settings


@dataclass(frozen=True)
class _Owned:
    """What a job kind works on, and the states its end and its queueing leave there."""

    noun: str
    param: str
    load: Callable[[Session, int], Any]
    ended: frozenset[str]  # what a failed or cancelled run leaves
    queued: str  # the state while the job waits
    # The domain's own bookkeeping for a job that ends without success (what a worker
    # calls when a run fails or is cancelled): cancelling a queued job calls it too.
    end: Callable[[Session, int, str], None]
    # Besides its state, what else must hold of the object (a batch that the gate failed
    # is also 'failed', but its images exist: only its synthesis's failure is retried).
    also: Callable[[Any], bool] = lambda _: True


_ENDED = frozenset(TERMINAL - {JobState.succeeded})
_OWNED: dict[str, _Owned] = {
    JobKind.ingest: _Owned(
        "dataset version",
        "version_id",
        datasets.get_version,
        _ENDED,
        DatasetVersionState.ingesting,
        dataset_service.ingest_ended,
    ),
    JobKind.synthesize: _Owned(
        "batch",
        "batch_id",
        batches.get_for_update,
        _ENDED,
        BatchState.generating,
        batch_service.generation_ended,
        lambda b: b.images_blob is None,
    ),
    JobKind.check: _Owned(
        "batch",
        "batch_id",
        batches.get_for_update,
        frozenset({BatchState.unchecked}),
        BatchState.unchecked,
        lambda s, batch_id, _state: batch_service.check_aborted(s, batch_id),
    ),
    JobKind.imagecheck: _Owned(
        "image check",
        "check_id",
        imagechecks.get,
        _ENDED,
        ImageCheckState.queued,
        imagecheck_service.ended,
    ),
    JobKind.export: _Owned(
        "export",
        "export_id",
        exports.get_for_update,
        _ENDED,
        ExportState.building,
        export_service.build_ended,
    ),
    JobKind.evaluate: _Owned(
        "evaluation",
        "evaluation_id",
        evaluations.get,
        _ENDED,
        EvaluationState.queued,
        evaluation_service.ended,
    ),
}


def _owned_object(session: Session, job: Job) -> tuple[_Owned | None, Any]:
    """The job kind's entry and the object it works on (None, None for a kind that owns
    none, such as training; the entry and None for an object since deleted)."""
    owned = _OWNED.get(job.kind)
    if owned is None:
        return None, None
    return owned, owned.load(session, int(job.params[owned.param]))


def cancel(session: Session, job_id: str) -> Job:
    """A queued job is cancelled at once; a running one stops at its next heartbeat (or,
    if its worker was lost, when the sweeper finds its lease expired)."""
    job = service.get(session, job_id)
    if job.state in TERMINAL:
        raise Conflict(f"job {job_id} is already {job.state}")
    job.cancel_requested = True
    if job.state == JobState.queued:
        _end_without_worker(session, job, JobState.cancelled, "cancelled before it started")
    session.flush()
    return job


def _end_without_worker(
    session: Session, job: Job, state: JobState, message: str, error: str | None = None
) -> None:
    """End ``job`` where no worker will: the row, the object it works on as a worker's own
    failure bookkeeping would leave it, and its uploaded files deleted after the commit."""
    job.state = state
    job.finished_at = utcnow()
    job.lease_owner = None
    job.lease_expires_at = None
    job.progress_message = message
    if error is not None:
        job.error = error
    end_object(session, job, state)


def end_object(session: Session, job: Job, state: JobState) -> None:
    """The object ``job`` works on takes the end ``state`` of its run, and files uploaded
    for the job are deleted once that is committed (also what the runner does for a job
    it gives up on after one claim too many)."""
    owned = _OWNED.get(job.kind)
    if owned is not None:
        owned.end(session, int(job.params[owned.param]), state)
    upload = job.params.get("upload_dir")
    if upload:
        on_commit(session, lambda: shutil.rmtree(upload, ignore_errors=True))


def requeue_stale(
    session: Session, settings: Settings, *, broker_lost_messages: bool = False
) -> list[tuple[str, str]]:
    """Find jobs whose worker died or whose message may be lost, and queue them again:
    running jobs whose lease expired, queued jobs never published (the broker was down)
    or waiting longer than ``requeue_after_seconds``, and every queued job when
    ``broker_lost_messages`` (the broker restarted and may have lost its queues).

    A running job whose worker was lost ends instead of going back to the queue when it
    was cancelled meanwhile (no worker is left to see the request) or its worker was lost
    ``max_attempts`` times; either way the object it works on ends with it.

    Returns (job id, queue) pairs to publish after the commit. A duplicate message is
    harmless: the claim lets only one delivery run the job.
    """
    now = utcnow()
    out: list[tuple[str, str]] = []
    for job in repository.expired_running(session, now):
        if job.cancel_requested:
            _end_without_worker(
                session, job, JobState.cancelled, "cancelled; its worker had stopped responding"
            )
        elif job.attempts >= job.max_attempts:
            _end_without_worker(
                session,
                job,
                JobState.failed,
                "failed: its worker stopped responding too often",
                error=f"the worker running this job was lost {job.attempts} times",
            )
        else:
            job.state = JobState.queued
            job.lease_owner = None
            job.lease_expires_at = None
            job.enqueued_at = now
            job.progress_message = "requeued: the worker holding it stopped responding"
            out.append((job.id, job.queue))
    before = (
        now if broker_lost_messages else now - timedelta(seconds=settings.requeue_after_seconds)
    )
    for job in repository.stale_queued(session, before):
        # No claim takes a cancelled job; cancelling a queued one ends it at once, so only
        # an older sweeper (which requeued lost jobs whatever was asked) left such a row.
        if job.cancel_requested:
            _end_without_worker(session, job, JobState.cancelled, "cancelled before it ran")
            continue
        job.enqueued_at = now
        out.append((job.id, job.queue))
    session.flush()
    for job_id, queue in out:
        service.publish_after_commit(session, settings, job_id, queue)
    return out


def retry(session: Session, settings: Settings, job_id: str, who: Principal) -> Job:
    """Queue the failed or cancelled job ``job_id`` again (409 with the reason otherwise);
    the audit trail records who did."""
    job = service.get(session, job_id)
    if job.state not in _ENDED:
        raise Conflict(f"job {job_id} is {job.state}: only a failed or cancelled job is retried")
    if "upload_dir" in job.params:
        raise Conflict(
            f"job {job_id} worked on uploaded files, which are deleted when it ends: "
            "upload them again"
        )
    owned, obj = _owned_object(session, job)
    if owned is not None:
        if obj is None:
            raise Conflict(f"the {owned.noun} job {job_id} worked on no longer exists")
        # A job cancelled before it started may have left its object as it was queued.
        if obj.state not in owned.ended | {owned.queued} or not owned.also(obj):
            raise Conflict(
                f"the {owned.noun} job {job_id} worked on is now {obj.state}: "
                "it cannot be run again"
            )
        obj.state = owned.queued
    if not repository.requeue_ended(session, job_id, list(_ENDED), utcnow()):
        raise Conflict(f"job {job_id} changed state while it was being retried")
    audit.record(session, who, "retry_job", "job", job_id, "ok", {"kind": job.kind})
    service.publish_after_commit(session, settings, job_id, job.queue)
    session.refresh(job)  # the conditional UPDATE does not touch the loaded object
    return job
