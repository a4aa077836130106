"""A thread in the worker's main process that re-publishes lost jobs.

Whatever the broker, a message can be lost (the embedded transport deletes it on
receipt) or delayed (Redis waits for its visibility timeout after a worker dies). The
jobs table knows better: a running job whose lease expired, or a queued job waiting
far longer than it should, is queued again. Duplicates are harmless (see the claim).
Every ten minutes it also removes the scratch folders of jobs that ended longer ago than
the retention setting (see :func:`synthray.app.jobs.service.prune_job_files`).
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError

from synthray.app.db import session_scope
from synthray.app.jobs import service as jobs
from synthray.config import Settings

log = logging.getLogger(__name__)
_started = threading.Event()


def sweep_once(settings: Settings) -> int:
    with session_scope(settings.sqlalchemy_url) as session:
        return len(jobs.requeue_stale(session, settings))


def prune_once(settings: Settings) -> int:
    with session_scope(settings.sqlalchemy_url) as session:
        return len(jobs.prune_job_files(session, settings))


PRUNE_EVERY_S = 600.0


def start(settings: Settings) -> None:
    if _started.is_set():
        return
    _started.set()
    interval = max(2.0, settings.job_lease_seconds / 4)

    def loop() -> None:
        last_prune = 0.0
        while True:
            time.sleep(interval)
            try:
                n = sweep_once(settings)
                if n:
                    log.warning("re-published %d job(s) whose worker or message was lost", n)
                if time.monotonic() - last_prune >= PRUNE_EVERY_S:
                    last_prune = time.monotonic()
                    n = prune_once(settings)
                    if n:
                        log.info("removed the scratch folders of %d long-ended job(s)", n)
            except SQLAlchemyError as exc:
                log.warning("job sweep failed: %s", type(exc).__name__)
            except Exception:
                log.exception("job sweep failed")

    threading.Thread(target=loop, name="synthray-sweeper", daemon=True).start()
