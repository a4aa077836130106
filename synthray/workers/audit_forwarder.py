"""A thread in the worker's main process that forwards the audit trail to syslog
(:mod:`synthray.app.audit.forward`) when ``SYNTHRAY_AUDIT_SYSLOG`` is set."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError

from synthray.app.audit.forward import Collector, forward_once
from synthray.config import Settings

log = logging.getLogger(__name__)
_started = threading.Event()
POLL_S = 1.0
MAX_BACKOFF_S = 30.0


def start(settings: Settings) -> None:
    if not settings.audit_syslog or _started.is_set():
        return
    _started.set()
    collector = Collector(settings.audit_syslog)

    def loop() -> None:
        wait, down = POLL_S, False
        while True:
            time.sleep(wait)
            try:
                sent = forward_once(settings.sqlalchemy_url, collector)
                if down:
                    log.info("the audit collector is reachable again")
                if sent:
                    log.info("forwarded %d audit records", sent)
                wait, down = POLL_S, False
            except (OSError, SQLAlchemyError) as exc:
                if not down:
                    log.warning("audit forwarding paused (%s); records wait", type(exc).__name__)
                wait, down = min(MAX_BACKOFF_S, max(POLL_S, wait * 2)), True
            except Exception as exc:  # never let the thread die
                log.error("audit forwarding failed (%s)", type(exc).__name__)
                wait = MAX_BACKOFF_S

    threading.Thread(target=loop, name="synthray-audit-forward", daemon=True).start()
