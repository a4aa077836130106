"""The audit trail as a hash chain, and the database rules that keep it append-only.

Each record carries ``seq`` (1, 2, 3 ... without gaps), the hash of its predecessor and
the hash of its own content: ``sha256(prev_hash + "\\n" + canonical JSON of the record)``.
A one-row table, ``audit_head``, holds the last ``seq`` and hash; appending locks it, so
records are numbered and chained in commit order by every process on both databases.

Triggers (created by migration 0005) make the database itself refuse UPDATE and DELETE on
``audit_events`` (and TRUNCATE on PostgreSQL), and DELETE on ``audit_head``. Someone who
can drop those triggers can still rewrite rows, but not without breaking the chain:
:func:`verify` walks it and names the first record that was altered, removed or inserted,
and notices records cut from the end through the head. What it cannot notice is a trail
rewritten from the first altered record onwards, chain and head included, by someone who
can run arbitrary SQL; the defence against that is to keep copies of the head's hash
outside the database (the log collector receives each record as it is written).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64
REFUSAL = "audit records are append-only"

# (dialect, statements) created by migration 0005 and dropped by its downgrade.
POSTGRES_TRIGGERS = [
    f"""
    CREATE OR REPLACE FUNCTION synthray_audit_append_only() RETURNS trigger AS $$
    BEGIN
        RAISE EXCEPTION '{REFUSAL}' USING ERRCODE = 'insufficient_privilege';
    END
    $$ LANGUAGE plpgsql
    """,
    "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
    "FOR EACH ROW EXECUTE FUNCTION synthray_audit_append_only()",
    "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
    "FOR EACH STATEMENT EXECUTE FUNCTION synthray_audit_append_only()",
    "CREATE TRIGGER audit_head_kept BEFORE DELETE ON audit_head "
    "FOR EACH ROW EXECUTE FUNCTION synthray_audit_append_only()",
    "CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head "
    "FOR EACH STATEMENT EXECUTE FUNCTION synthray_audit_append_only()",
]
POSTGRES_DROP = [
    "DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events",
    "DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events",
    "DROP TRIGGER IF EXISTS audit_head_kept ON audit_head",
    "DROP TRIGGER IF EXISTS audit_head_no_truncate ON audit_head",
    "DROP FUNCTION IF EXISTS synthray_audit_append_only()",
]
SQLITE_TRIGGERS = [
    f"CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events "
    f"BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END",
    f"CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
    f"BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END",
    f"CREATE TRIGGER audit_head_kept BEFORE DELETE ON audit_head "
    f"BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END",
]
SQLITE_DROP = [
    "DROP TRIGGER IF EXISTS audit_events_no_update",
    "DROP TRIGGER IF EXISTS audit_events_no_delete",
    "DROP TRIGGER IF EXISTS audit_head_kept",
]


def triggers(dialect: str) -> list[str]:
    return POSTGRES_TRIGGERS if dialect == "postgresql" else SQLITE_TRIGGERS


def drop_triggers(dialect: str) -> list[str]:
    return POSTGRES_DROP if dialect == "postgresql" else SQLITE_DROP


def _timestamp(at: datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def content(
    *,
    seq: int,
    at: datetime,
    actor_key_id: int | None,
    actor_name: str | None,
    action: str,
    object_type: str,
    object_id: str | None,
    outcome: str,
    detail: dict[str, Any],
) -> bytes:
    """The canonical bytes of a record: sorted-key JSON without whitespace."""
    return json.dumps(
        {
            "seq": seq,
            "at": _timestamp(at),
            "actor_key_id": actor_key_id,
            "actor_name": actor_name,
            "action": action,
            "object_type": object_type,
            "object_id": object_id,
            "outcome": outcome,
            "detail": detail,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def link(prev_hash: str, record: bytes) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + record).hexdigest()


def row_content(row: Any) -> bytes:
    """:func:`content` of an ``AuditEvent`` row (or any object with its attributes)."""
    return content(
        seq=row.seq,
        at=row.at,
        actor_key_id=row.actor_key_id,
        actor_name=row.actor_name,
        action=row.action,
        object_type=row.object_type,
        object_id=row.object_id,
        outcome=row.outcome,
        detail=row.detail or {},
    )


@dataclass
class Verdict:
    records: int
    head_seq: int | None
    head_hash: str | None
    problem: str | None  # the first break, in one sentence; None: intact

    @property
    def intact(self) -> bool:
        return self.problem is None


def _first_break(rows: Iterable[Any]) -> tuple[int, int, str, str | None]:
    """(records read, last good seq, last good hash, the first problem or None)."""
    prev_hash, last, count = GENESIS, 0, 0
    for row in rows:
        count += 1
        if row.seq != last + 1:
            if row.seq > last + 1:
                gone = (
                    f"record {last + 1}"
                    if row.seq == last + 2
                    else f"records {last + 1} to {row.seq - 1}"
                )
                return (
                    count,
                    last,
                    prev_hash,
                    f"{gone} missing: the trail jumps from {last} to {row.seq}",
                )
            return count, last, prev_hash, f"record {row.seq} (id {row.id}) appears twice"
        if row.prev_hash != prev_hash:
            return (
                count,
                last,
                prev_hash,
                (
                    f"record {row.seq} (id {row.id}) does not follow record {last}: inserted, "
                    "or its predecessor was replaced"
                ),
            )
        if link(prev_hash, row_content(row)) != row.hash:
            return (
                count,
                last,
                prev_hash,
                (
                    f"record {row.seq} (id {row.id}) was altered: its content no longer matches "
                    "its hash"
                ),
            )
        prev_hash, last = row.hash, row.seq
    return count, last, prev_hash, None


def verify(rows: Iterable[Any], head: tuple[int, str] | None) -> Verdict:
    """Walk the records in ``seq`` order and stop at the first break; then hold the end of
    the trail against the head row, which notices records cut from the end."""
    count, last, last_hash, problem = _first_break(rows)
    head_seq, head_hash = head if head is not None else (None, None)
    if problem is None:
        if head_seq is None:
            problem = None if last == 0 else "the head record (audit_head) is missing"
        elif head_seq > last:
            problem = f"records {last + 1} to {head_seq} were removed from the end"
        elif head_seq != last or head_hash != last_hash:
            problem = f"the head (record {head_seq}) does not match the last record ({last})"
    return Verdict(count, head_seq, head_hash, problem)
