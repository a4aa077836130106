"""A thread in the worker's main process that re-publishes lost jobs.

Whatever the broker, a message can be lost (the embedded transport deletes it on
receipt) or delayed (Redis waits for its visibility timeout after a worker dies). The
jobs table knows better: a running job whose lease expired, or a queued job waiting
far longer than it should, is queued again (or ended, when it was cancelled while its
worker was lost, or lost too often). Duplicates are harmless (see the claim).
Every ten minutes it also removes the scratch folders of jobs that ended longer ago than
the retention setting (see :func:`synthray.app.jobs.service.prune_job_files`).
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError

from synthray.app.db import session_scope
from synthray.app.jobs import broker, control
from synthray.app.jobs import service as jobs
from synthray.config import Settings

log = logging.getLogger(__name__)
_started = threading.Event()


class BrokerWatch:
    """Tells when the broker may have lost its queued messages since the last look: it
    was unreachable then and answers now, or it answers with a new run id (Redis
    restarted). Either way every queued job is published again at once, so a job lost
    with the broker's memory runs within one sweep of its return."""

    def __init__(self) -> None:
        self.last: str | None = None
        self.was_down = False

    def lost_messages(self, settings: Settings) -> bool:
        try:
            now = broker.epoch(settings)
        except Exception as exc:
            if not self.was_down:
                log.warning("broker unreachable (%s); jobs wait for it", type(exc).__name__)
            self.was_down = True
            return False
        lost = self.was_down or (self.last is not None and now != self.last)
        self.last, self.was_down = now, False
        return lost


def sweep_once(settings: Settings, *, broker_lost_messages: bool = False) -> int:
    with session_scope(settings.sqlalchemy_url) as session:
        found = control.requeue_stale(session, settings, broker_lost_messages=broker_lost_messages)
        return len(found)


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
        watch = BrokerWatch()
        while True:
            time.sleep(interval)
            try:
                lost = watch.lost_messages(settings)
                if lost:
                    log.warning("the broker is back and may have lost messages: re-publishing")
                n = sweep_once(settings, broker_lost_messages=lost)
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
