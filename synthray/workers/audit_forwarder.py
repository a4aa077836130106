"""A thread in the worker's main process that forwards the audit trail to syslog
(:mod:`synthray.app.audit.forward`) when ``SYNTHRAY_AUDIT_SYSLOG`` is set."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError

from synthray.app.audit.forward import Collector, forward_once, tls_context
from synthray.config import Settings

log = logging.getLogger(__name__)
_started = threading.Event()
POLL_S = 1.0
MAX_BACKOFF_S = 30.0


def start(settings: Settings) -> None:
    if not settings.audit_syslog or _started.is_set():
        return
    context = None
    if settings.audit_syslog.startswith("tls://"):
        # A missing or unreadable CA or client certificate stops the worker here, with the
        # file's error, rather than leaving the trail unforwarded unseen.
        context = tls_context(
            str(settings.audit_syslog_ca) if settings.audit_syslog_ca else None,
            str(settings.audit_syslog_cert) if settings.audit_syslog_cert else None,
            str(settings.audit_syslog_key) if settings.audit_syslog_key else None,
        )
    collector = Collector(settings.audit_syslog, context=context)
    _started.set()

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
