"""Append-only, hash-chained audit trail of sensitive acts (keys, export requests,
approvals, downloads, refused requests)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from synthray.app.audit import chain, repository
from synthray.app.audit.schemas import AuditFilter, AuditRead
from synthray.app.audit.tables import AuditEvent
from synthray.app.auth.schemas import Principal
from synthray.app.db import begin_writes, commit, session_scope, utcnow


def record(
    session: Session,
    who: Principal | None,
    action: str,
    object_type: str,
    object_id: str | int | None,
    outcome: str,
    detail: dict[str, Any] | None = None,
) -> None:
    seq, prev_hash = repository.advance_head(session)
    event = AuditEvent(
        seq=seq,
        at=utcnow(),
        actor_key_id=who.key_id if who else None,
        actor_name=who.name if who else None,
        action=action,
        object_type=object_type,
        object_id=str(object_id) if object_id is not None else None,
        outcome=outcome,
        detail=detail or {},
        prev_hash=prev_hash,
    )
    event.hash = chain.link(prev_hash, chain.row_content(event))
    repository.add(session, event)
    repository.set_head_hash(session, seq, event.hash)


def record_refusal(
    session: Session,
    who: Principal | None,
    action: str,
    object_type: str,
    object_id: str | int | None,
    reason: str,
) -> None:
    """Commit a refusal now: the request that caused it ends in an error and rolls back.

    The request session is used (rather than a second connection) because SQLite takes
    its write lock at BEGIN and a second writer would wait on the first.
    """
    session.rollback()
    begin_writes(session)  # the chain's head and the record together, on any session
    record(session, who, action, object_type, object_id, "refused", {"reason": reason})
    commit(session)


def list_events(session: Session, limit: int, where: AuditFilter | None = None) -> list[AuditRead]:
    """The newest records first."""
    events = repository.list_recent(session, limit, where or AuditFilter())
    return [AuditRead.model_validate(e) for e in events]


def download_starts(session: Session, export_id: int, actor_name: str) -> list[tuple[Any, int]]:
    """When, and from which byte, ``actor_name`` downloaded the export (for grant limits)."""
    return repository.download_starts(session, export_id, actor_name)


def verify_trail(database_url: str) -> chain.Verdict:
    """Walk the whole trail in one read-only transaction (``synthray audit verify``)."""
    with session_scope(database_url, read_only=True) as s:
        return chain.verify(repository.in_order(s), repository.head(s))
