"""Forward the audit trail to the hospital's log collector as syslog (RFC 5424).

Requests only ever write audit rows to the database; nothing here runs in a request, so a
collector that is slow or down never blocks one. A forwarder (a thread in every worker,
``SYNTHRAY_AUDIT_SYSLOG=tls://host:port``, ``tcp://host:port`` or ``udp://host:port``)
sends the records after the last one the collector took, in order, and moves a cursor
(``audit_forward``) after each send. While the collector is down the cursor stays, and
everything written meanwhile goes out when it returns: nothing is lost. The cursor row is
locked while a batch is sent, so several workers never send the same record twice in the
normal course; a crash between a send and the cursor's commit sends that batch again
(at-least-once: each message carries the record's ``seq`` and hash, so the collector can
drop repeats).

Messages go over TLS (RFC 5425: TLS 1.2 or later, the collector's certificate verified
against ``SYNTHRAY_AUDIT_SYSLOG_CA`` or the system's trust store and its name checked, and a
client certificate for collectors that require one), over plain TCP, both with
octet-counting framing (RFC 6587), or one datagram each over UDP (which can lose messages
unseen; use TLS or TCP where that matters). Each carries the record as
RFC 5424 structured data (``synthray@32473``: seq, hash, prev, action, object, outcome,
actor) and its JSON as the message, facility ``authpriv`` (10), severity notice (5), or
warning (4) for refusals.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Integer, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from synthray.app.audit.tables import AuditEvent
from synthray.app.db import Base, session_scope

log = logging.getLogger(__name__)

FACILITY_AUTHPRIV = 10
SD_ID = "synthray@32473"  # 32473: the example enterprise number of RFC 5612
BATCH = 200
ALERT_WAIT_S = 0.25  # how long a new TLS connection waits for a refusal


class AuditForward(Base):
    """One row (id 1): the last ``seq`` the collector accepted."""

    __tablename__ = "audit_forward"

    id: Mapped[int] = mapped_column(primary_key=True)
    sent_seq: Mapped[int] = mapped_column(Integer, default=0)
    target: Mapped[str] = mapped_column(String(200), default="")


def _sd_value(value: object) -> str:
    # RFC 5424 6.3.3: escape '"', '\' and ']' in PARAM-VALUE.
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def message(event: AuditEvent, hostname: str) -> bytes:
    """One RFC 5424 message for an audit record."""
    severity = 4 if event.outcome == "refused" else 5
    pri = FACILITY_AUTHPRIV * 8 + severity
    stamp = event.at.isoformat(timespec="microseconds").replace("+00:00", "Z")
    params = {
        "seq": event.seq,
        "hash": event.hash,
        "prev": event.prev_hash,
        "action": event.action,
        "object": f"{event.object_type}:{event.object_id or ''}",
        "outcome": event.outcome,
        "actor": event.actor_name or "",
    }
    sd = "[" + SD_ID + "".join(f' {k}="{_sd_value(v)}"' for k, v in params.items()) + "]"
    body: dict[str, Any] = {
        "seq": event.seq,
        "at": stamp,
        "actor_key_id": event.actor_key_id,
        "actor_name": event.actor_name,
        "action": event.action,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "outcome": event.outcome,
        "detail": event.detail,
    }
    host = (hostname or "-")[:255]
    head = f"<{pri}>1 {stamp} {host} synthray - audit {sd} "
    # The BOM marks the message as UTF-8 (RFC 5424 6.4).
    return head.encode() + b"\xef\xbb\xbf" + json.dumps(body, sort_keys=True).encode()


def tls_context(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client context for RFC 5425: TLS 1.2 or later, the server's certificate verified
    (against ``ca_file``, else the system's trust store) and its host name checked, and the
    client certificate ``cert_file`` (with ``key_file``, if separate) when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class Collector:
    """A connection to the collector named by a ``tls://``, ``tcp://`` or ``udp://`` URL
    (``context``: the TLS client context for ``tls://``, default :func:`tls_context`)."""

    def __init__(
        self, url: str, timeout: float = 5.0, context: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("tls", "tcp", "udp") or not parts.hostname or not parts.port:
            raise ValueError(
                "SYNTHRAY_AUDIT_SYSLOG must be tls://host:port, tcp://host:port or udp://host:port"
            )
        self.scheme, self.address, self.timeout = (
            parts.scheme,
            (parts.hostname, parts.port),
            timeout,
        )
        self.context = (context or tls_context()) if parts.scheme == "tls" else None
        self.sock: socket.socket | None = None

    def send(self, messages: Iterable[bytes]) -> None:
        if self.sock is None:
            if self.scheme in ("tcp", "tls"):
                sock = socket.create_connection(self.address, timeout=self.timeout)
                if self.context is not None:  # tls://
                    sock = self._tls(sock, self.context)
                self.sock = sock
            else:
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.sock.settimeout(self.timeout)
        try:
            for m in messages:
                if self.scheme != "udp":
                    self.sock.sendall(str(len(m)).encode() + b" " + m)  # octet counting
                else:
                    self.sock.sendto(m, self.address)
        except OSError:
            self.close()
            raise

    def _tls(self, raw: socket.socket, context: ssl.SSLContext) -> socket.socket:
        """The TLS connection over ``raw``, or OSError (ssl.SSLError included). A collector
        that refuses our certificate says so only after the TLS 1.3 handshake, with an
        alert; a short read catches it here instead of after a batch is counted as sent.
        A collector never writes otherwise, so the read normally times out."""
        try:
            sock = context.wrap_socket(raw, server_hostname=self.address[0])
        except OSError:
            raw.close()
            raise
        try:
            sock.settimeout(ALERT_WAIT_S)
            if sock.recv(1) == b"":
                raise ConnectionResetError("the collector closed the TLS connection")
        except TimeoutError:
            pass
        except OSError:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _cursor(session: Session) -> AuditForward:
    row = session.scalars(
        select(AuditForward).where(AuditForward.id == 1).with_for_update()
    ).one_or_none()
    if row is None:
        row = AuditForward(id=1, sent_seq=0, target="")
        session.add(row)
        session.flush()
    return row


def forward_once(database_url: str, collector: Collector, hostname: str | None = None) -> int:
    """Send the records the collector has not taken yet, in batches; returns how many were
    sent. Raises OSError when the collector cannot be reached (the cursor stays)."""
    host = hostname or socket.gethostname()
    total = 0
    while True:
        with session_scope(database_url) as s:
            cursor = _cursor(s)
            batch = list(
                s.scalars(
                    select(AuditEvent)
                    .where(AuditEvent.seq > cursor.sent_seq)
                    .order_by(AuditEvent.seq)
                    .limit(BATCH)
                )
            )
            if not batch:
                return total
            collector.send(message(e, host) for e in batch)
            cursor.sent_seq = batch[-1].seq
            total += len(batch)
