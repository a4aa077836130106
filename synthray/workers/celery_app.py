"""The worker's Celery application.

One task, ``synthray.run_job``, takes a job id. Late acks, prefetch 1 and
reject-on-worker-lost let the broker redeliver a job whose process died; the job row's
lease makes sure a redelivered or duplicated message never runs the work twice.
"""

from __future__ import annotations

import logging

from celery import Celery, signals

import synthray.app.tables  # noqa: F401  (every table mapped, so foreign keys resolve)
from synthray.app.jobs.broker import TASK_NAME, celery_config
from synthray.config import get_settings

log = logging.getLogger(__name__)

settings = get_settings()
app = Celery("synthray")
app.conf.update(celery_config(settings.broker_url, settings.broker_dir.resolve()))


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> None:
    from synthray.workers.runner import run

    run(job_id)


@signals.setup_logging.connect
def _logs(loglevel: str | int | None = None, **_: object) -> None:
    """Our format (JSON lines with the request and job ids) instead of Celery's own."""
    from synthray import logs

    if isinstance(loglevel, int):
        level = logging.getLevelName(loglevel)
    else:
        level = loglevel or settings.log_level
    logs.configure(settings.log_format, level)


@signals.worker_ready.connect
def _start_sweeper(**_: object) -> None:
    from synthray.workers import audit_forwarder
    from synthray.workers.sweeper import start

    start(settings)
    audit_forwarder.start(settings)


@signals.worker_process_init.connect
def _job_process_runtime(**_: object) -> None:
    """Every job process: the ``cpu_bf16`` setting, and glibc keeps freed pages (jobs
    allocate and free the same large tensors every training step; see
    :func:`synthray.models.runtime.keep_freed_memory`)."""
    from synthray.models.runtime import allow_cpu_bf16, keep_freed_memory

    allow_cpu_bf16(settings.cpu_bf16 != "off")
    if not keep_freed_memory():
        log.info("allocator left as it is (not glibc)")
